"""Converts the SigLIP2 vision tower of the alignment loss (official ``repa_model``) to an orbax
directory.

    python -m detailflow_jax.convert.siglip2 --checkpoint model.safetensors --out DIR [--layers 27] [--heads 16]

Accepted checkpoints (.safetensors / .npz / .pt):
* HF ``google/siglip2-so400m-patch16-naflex`` (``model.safetensors``): keys
  ``vision_model.embeddings. {patch_embedding (1152, 768) Linear, position_embedding (256, 1152)}``,
  ``vision_model.encoder.layers.{i}.*``, ``vision_model.post_layernorm.*``. The text model, the
  vision pooling head and ``logit_scale``/``logit_bias`` are reported and skipped.
* An official DetailFlow tokenizer checkpoint: its frozen copy ``repa_model.visual_model.*``
  (``--prefix repa_model.``); every other tensor of the checkpoint is reported and skipped.

The prefix is detected when ``--prefix`` is not given. ``--layers`` converts the first L layers
(default: all the checkpoint has; the official target uses all 27). The directory holds ``{"tower":
params, "num_heads": int}``; pass it as ``--config.losses.siglip_weights`` (and as
``--config.encoder_weights``: the tokenizer encoder starts from its first ``encoder.depth`` layers,
``train/encoder_init.py``).
"""  # noqa: E501

from __future__ import annotations

import re
from typing import Mapping

import flax.linen as nn
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
from detailflow_jax.convert.tokenizer import KeySource, read_mapped, state_dict_key_map
from detailflow_jax.losses.alignment import SiglipVisionTower
from detailflow_jax.tokenizer.config import make_model_config

HF_BASE = "vision_model."
REPA_BASE = "repa_model.visual_model."
_ENCODER_BASE = "encoder.visual_model."  # the tokenizer encoder's keys (same HF layout)
SO400M_HEADS = 16


def tower_key_map(depth: int, base: str) -> dict[tuple[str, ...], KeySource]:
    """``SiglipVisionTower`` parameter path -> state-dict key under ``base`` (e.g.
    ``"vision_model."``).

    The tokenizer encoder is the same HF vision transformer with the same Flax names, so its key map
    is reused: the ``encoder.visual_model.*`` entries of a placeholder tokenizer config of this
    depth (only the depth matters for the map), re-rooted at ``base``. The encoder's own tables
    (latent tokens etc.) are not under that prefix.
    """
    placeholder = make_model_config(
        encoder=dict(width=1, depth=depth, heads=1, mlp_dim=1),
        decoder=dict(width=1, depth=1, heads=1, mlp_dim=1),
        image_size=16,
        num_latent_tokens=1,
        group_size=1,
        causal_num=1,
        codebook_size=64,
    )
    return {path[1:]: KeySource(base + src.torch_key[len(_ENCODER_BASE):], src.transpose)
            for path, src in state_dict_key_map(placeholder).items()
            if path[0] == "encoder" and src.torch_key.startswith(_ENCODER_BASE)}


def detect_base(state: Mapping[str, np.ndarray], prefix: str | None = None) -> str:
    """The key prefix of the vision transformer (``vision_model.`` or
    ``repa_model.visual_model.``)."""
    candidates = [prefix, prefix + "visual_model."] if prefix else [HF_BASE, REPA_BASE]
    for base in candidates:
        if f"{base}embeddings.position_embedding.weight" in state:
            return base
    raise ConversionError(
        f"no SigLIP2 vision tower found{f' under --prefix {prefix!r}' if prefix else ''}: expected "
        "'<prefix>embeddings.position_embedding.weight' with prefix "
        f"{' or '.join(map(repr, candidates))} (an HF "
        "siglip2-so400m-patch16-naflex model.safetensors, or a DetailFlow tokenizer checkpoint "
        "with repa_model.*); "
        f"first keys: {sorted(state)[:5]}"
    )


def _layers_in(state: Mapping[str, np.ndarray], base: str) -> int:
    pattern = re.compile(re.escape(base) + r"encoder\.layers\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if not found:
        raise ConversionError(f"no {base}encoder.layers.* tensors in the checkpoint")
    return max(found) + 1


def tower_from_state(
    state: Mapping[str, np.ndarray], base: str, layers: int, heads: int
) -> SiglipVisionTower:
    """A ``SiglipVisionTower`` sized like the state dict (``heads`` cannot be read off the
    shapes)."""
    def shape(key):
        if base + key not in state:
            raise ConversionError(f"SigLIP2 checkpoint: missing key {base + key}")
        return state[base + key].shape

    width = shape("embeddings.position_embedding.weight")[-1]
    pos_grid = int(round(shape("embeddings.position_embedding.weight")[0] ** 0.5))
    patch = int(round((shape("embeddings.patch_embedding.weight")[-1] / 3) ** 0.5))
    mlp_dim = shape("encoder.layers.0.mlp.fc1.weight")[0]
    if width % heads:
        raise ConversionError(f"--heads {heads} does not divide the checkpoint's width {width}")
    return SiglipVisionTower(
        width=width, depth=layers, heads=heads, mlp_dim=mlp_dim, patch_size=patch, pos_grid=pos_grid
    )


def convert_siglip2(
    state: Mapping[str, np.ndarray],
    layers: int | None = None,
    heads: int = SO400M_HEADS,
    prefix: str | None = None,
) -> tuple[dict, list[str]]:
    """State dict -> ({"tower": params (float32), "num_heads": int32}, skipped keys).

    ConversionError names missing keys, unexpected keys under the tower's prefix, and shape
    mismatches (by checkpoint key, in the checkpoint's layout).
    """
    base = detect_base(state, prefix)
    available = _layers_in(state, base)
    layers = available if layers is None else layers
    if not 0 < layers <= available:
        raise ConversionError(
            f"--layers {layers}: the checkpoint has {available} layers under {base}encoder.layers"
        )
    tower = tower_from_state(state, base, layers, heads)
    size = tower.patch_size * tower.pos_grid
    abstract = jax.eval_shape(
        tower.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    )
    abstract = nn.unbox(abstract["params"])

    # Everything outside the tower, its pooling head and the layers not converted is skipped on
    # purpose.
    tower_keys = {k: v for k, v in state.items() if k.startswith(base)}
    skip = (base + "head.",) + tuple(f"{base}encoder.layers.{i}." for i in range(layers, available))
    reader = StateDictReader(tower_keys, skip_prefixes=skip, name=f"SigLIP2 tower ({base}*)")
    flat = read_mapped(reader, tower_key_map(layers, base), abstract, f"SigLIP2 tower ({base}*)")
    skipped = reader.finish() + sorted(k for k in state if not k.startswith(base))
    params = assign_to_tree(flat, abstract, name=f"SigLIP2 tower ({base}*)")
    return {"tower": params, "num_heads": np.asarray(heads, np.int32)}, skipped


def summarize_skipped(skipped: list[str]) -> str:
    """``prefix* (n tensors)`` groups by the first two key components."""
    groups: dict[str, int] = {}
    for key in skipped:
        group = ".".join(key.split(".")[:2])
        groups[group] = groups.get(group, 0) + 1
    return ", ".join(f"{g}* ({n})" for g, n in sorted(groups.items())) or "none"


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "HF siglip2-so400m-patch16-naflex model.safetensors, "
                        "or a DetailFlow tokenizer checkpoint", flag_values=fv, required=True)
    cli.define_out(fv, "output orbax directory (pass it as --config.losses.siglip_weights and "
                   "--config.encoder_weights)")
    flags.DEFINE_integer("layers", None, "convert the first L layers (default: all; so400m: 27)",
                         flag_values=fv)
    flags.DEFINE_integer("heads", SO400M_HEADS, "attention heads (so400m: 16)", flag_values=fv)
    flags.DEFINE_string("prefix", None, "key prefix of the tower: vision_model. (HF) or "
                        "repa_model. (tokenizer checkpoint); detected when omitted", flag_values=fv)
    cli.define_force(fv)


def main(argv=None) -> None:
    args = cli.parse(argv, __doc__, _define_flags)
    # a ConversionError (not the tower's keys, a bad shape) is one line through cli_errors.run
    tree, skipped = convert_siglip2(load_state_dict(args.checkpoint), args.layers, args.heads,
                                    args.prefix)
    count = sum(int(x.size) for x in jax.tree.leaves(tree["tower"]))
    print(
        f"converted {args.checkpoint}: {len(tree['tower']['layers'])} layers, {count:,} parameters "
        f"-> {save_params(args.out, tree, force=args.force)}"
    )
    print(f"skipped ({len(skipped)} tensors): {summarize_skipped(skipped)}")


if __name__ == "__main__":
    cli_errors.run(main)
