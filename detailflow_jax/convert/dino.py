"""Converts the DINO ViT-S/16 backbone (and optionally trained discriminator heads) to an orbax
directory.

    python -m detailflow_jax.convert.dino --backbone dino_deitsmall16_pretrain.pth [--heads heads.pth] --out DIR

* ``--backbone``: the official DINO checkpoint (timm names: ``patch_embed.proj``, ``cls_token``,
  ``pos_embed``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``;
  ``norm.*``/``head.*`` are unused). The fused qkv is split into the q/k/v projections of
  ``ViTBlock`` and the k bias is zeroed, as the official loader does.
* ``--heads``: a ``DinoDisc.heads`` state dict (``{h}.0.0.weight_orig|weight_u|weight_v|bias``,
  ``{h}.0.1.*`` BatchNorm, ``{h}.1.fn.{0,1}.*``, ``{h}.2.*``), e.g. from a trained official
  tokenizer checkpoint (``discriminator.heads.`` prefixes are stripped). Without it the heads are
  trained from their initialisation.

The directory holds ``{"backbone": params, "heads": {"params", "batch_stats"}}`` (heads only when
given); pass it as ``--config.losses.dino_weights``.
"""  # noqa: E501

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from absl import flags

from detailflow_jax import cli, cli_errors
from detailflow_jax.params_io import save_params
from detailflow_jax.convert.state_dict import (
    ConversionError,
    StateDictReader,
    assign_to_tree,
    load_state_dict,
)
from detailflow_jax.losses.dino import DinoViT
from detailflow_jax.losses.discriminator import DinoDiscriminator

_HEAD_PREFIXES = ("discriminator.heads.", "heads.")


def _blocks_in(state) -> int:
    return 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)


def backbone_config(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """DinoViT/DinoDiscriminator size arguments read off a backbone state dict (ViT-S/16 for the
    official file)."""
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in state]
    if missing:
        raise ConversionError(
            f"DINO backbone (--backbone) has no {', '.join(missing)}; expected a DINO/timm ViT "
            f"state dict such as dino_deitsmall16_pretrain.pth (first keys: {sorted(state)[:5]})"
        )
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = int(round(np.sqrt(state["pos_embed"].shape[1] - 1)))
    depth = _blocks_in(state)
    return {"width": width, "patch": patch, "img_size": grid * patch, "depth": depth}


def convert_backbone(state: dict[str, np.ndarray], model: DinoViT) -> Any:
    """timm/DINO state dict -> ``DinoViT`` params (float32), k-bias zeroed."""
    reader = StateDictReader(
        state, skip_prefixes=("norm.", "head."), name="DINO backbone (--backbone)"
    )
    w = reader.take("patch_embed.proj.weight")
    flat = {
        # OIHW -> HWIO
        ("patch_embed", "kernel"): None if w is None else np.transpose(w, (2, 3, 1, 0)),
        ("patch_embed", "bias"): reader.take("patch_embed.proj.bias"),
        ("cls_token",): reader.take("cls_token"),
        ("pos_embed",): reader.take("pos_embed"),
    }
    width = model.width
    for i in range(max(model.key_depths) + 1):
        src, dst = f"blocks.{i}", f"layers_{i}"
        for norm, ln in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
            flat[(dst, ln, "scale")] = reader.take(f"{src}.{norm}.weight")
            flat[(dst, ln, "bias")] = reader.take(f"{src}.{norm}.bias")
        qkv_w, qkv_b = reader.take(f"{src}.attn.qkv.weight"), reader.take(f"{src}.attn.qkv.bias")
        if qkv_w is not None and qkv_b is not None:
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                rows = slice(j * width, (j + 1) * width)
                # official loader
                bias = np.zeros(width, np.float32) if name == "k_proj" else qkv_b[rows]
                flat[(dst, "self_attn", name, "kernel")] = qkv_w[rows].T
                flat[(dst, "self_attn", name, "bias")] = bias
        flat[(dst, "self_attn", "out_proj", "kernel")] = reader.linear_kernel(
            f"{src}.attn.proj.weight"
        )
        flat[(dst, "self_attn", "out_proj", "bias")] = reader.take(f"{src}.attn.proj.bias")
        for fc in ("fc1", "fc2"):
            flat[(dst, "mlp", fc, "kernel")] = reader.linear_kernel(f"{src}.mlp.{fc}.weight")
            flat[(dst, "mlp", fc, "bias")] = reader.take(f"{src}.mlp.{fc}.bias")
    reader.finish()
    x = jnp.zeros((1, model.img_size, model.img_size, 3))
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return assign_to_tree(flat, abstract, name="DINO backbone")


def _strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in _HEAD_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def convert_heads(
    state: dict[str, np.ndarray], disc: DinoDiscriminator, backbone_params: Any
) -> dict:
    """``DinoDisc.heads`` state dict -> ``{"params", "batch_stats"}`` of ``DinoDiscriminator``
    (float32)."""
    reader = StateDictReader(
        _strip_prefix(state), skip_prefixes=(), name="DINO discriminator heads (--heads)"
    )
    params, stats = {}, {}

    def sn_conv(src, dst):
        w = reader.take(f"{src}.weight_orig")
        # (out, in, k) -> (k, in, out)
        params[dst + ("kernel",)] = None if w is None else np.transpose(w, (2, 1, 0))
        params[dst + ("bias",)] = reader.take(f"{src}.bias")
        stats[dst + ("u",)] = reader.take(f"{src}.weight_u")
        stats[dst + ("v",)] = reader.take(f"{src}.weight_v")

    def batch_norm(src, dst):
        params[dst + ("scale",)] = reader.take(f"{src}.weight")
        params[dst + ("bias",)] = reader.take(f"{src}.bias")
        stats[dst + ("mean",)] = reader.take(f"{src}.running_mean")
        stats[dst + ("var",)] = reader.take(f"{src}.running_var")
        if reader.has(f"{src}.num_batches_tracked"):
            # only used by momentum=None BatchNorm
            reader.take(f"{src}.num_batches_tracked", floating=False)

    for h in range(len(disc.key_depths) + 1):
        head = f"head_{h}"
        sn_conv(f"{h}.0.0", (head, "block_conv"))
        batch_norm(f"{h}.0.1", (head, "block_norm"))
        sn_conv(f"{h}.1.fn.0", (head, "residual_conv"))
        batch_norm(f"{h}.1.fn.1", (head, "residual_norm"))
        sn_conv(f"{h}.2", (head, "out"))
    reader.finish()
    x = jnp.zeros((1, disc.img_size, disc.img_size, 3))
    abstract = jax.eval_shape(lambda: disc.init(jax.random.key(0), x, backbone_params, train=False))
    return {
        "params": assign_to_tree(params, abstract["params"], name="DINO heads"),
        "batch_stats": assign_to_tree(stats, abstract["batch_stats"], name="DINO head statistics"),
    }


def discriminator_for(state: dict[str, np.ndarray]) -> DinoDiscriminator:
    """A ``DinoDiscriminator`` sized like the backbone state dict (read-outs after blocks 2, 5, 8,
    11 of 12)."""
    cfg = backbone_config(state)
    key_depths = tuple(d for d in (2, 5, 8, 11) if d < cfg["depth"])
    return DinoDiscriminator(width=cfg["width"], heads=cfg["width"] // 64, patch=cfg["patch"],
                             img_size=cfg["img_size"], key_depths=key_depths)


def convert_dino(
    backbone_state: dict[str, np.ndarray], heads_state: dict[str, np.ndarray] | None = None
) -> dict:
    disc = discriminator_for(backbone_state)
    backbone = convert_backbone(backbone_state, disc.backbone())
    tree = {"backbone": backbone}
    if heads_state is not None:
        tree["heads"] = convert_heads(heads_state, disc, backbone)
    return tree


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("backbone", None, "dino_deitsmall16_pretrain.pth (or .npz/.safetensors)",
                        flag_values=fv, required=True)
    flags.DEFINE_string("heads", None, "optional trained DinoDisc heads state dict", flag_values=fv)
    cli.define_out(fv, "output orbax directory (pass it as --config.losses.dino_weights)")
    cli.define_force(fv)


def main(argv=None) -> None:
    args = cli.parse(argv, __doc__, _define_flags)
    tree = convert_dino(
        load_state_dict(args.backbone), load_state_dict(args.heads) if args.heads else None
    )
    print(f"wrote DINO discriminator weights to {save_params(args.out, tree, force=args.force)}")


if __name__ == "__main__":
    cli_errors.run(main)
