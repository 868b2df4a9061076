r"""Import an official DetailFlow tokenizer state dict (official ``VQModel``) into the Flax
parameter tree.

    python -m detailflow_jax.convert.tokenizer --checkpoint 128.pt --config configs/tokenizer.py:DF-16 \
        --out /ckpt/df16_params [--force] [--config.model.dtype=bfloat16]

Accepts .pt (flat or wrapped in {"model": …}; read without torch), .npz and .safetensors. Train-only
tensors — ``repa_model.*`` (the frozen 27-layer SigLIP2 of the alignment loss),
``global_token_proj.*`` and ``quantize.codebook_used`` — are reported and skipped, or returned in a
side dict with ``keep_train_only``.
"""  # noqa: E501

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
from absl import flags

from detailflow_jax import cli, cli_errors
from detailflow_jax.convert.state_dict import (ConversionError, StateDictReader, assign_to_tree,
                                               load_state_dict)
from detailflow_jax.tokenizer.config import TokenizerConfig, validate

TRAIN_ONLY_PREFIXES = ("repa_model.", "global_token_proj.", "quantize.codebook_used")

_BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


@dataclasses.dataclass(frozen=True)
class KeySource:
    """Where a Flax leaf comes from: a torch key, transposed when it is a Linear weight."""
    torch_key: str
    transpose: bool = False

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(flax_shape)) if self.transpose else tuple(flax_shape)


def read_mapped(
    reader: StateDictReader, key_map: Mapping[tuple[str, ...], KeySource], abstract: Any, name: str
) -> dict[tuple[str, ...], np.ndarray]:
    """{Flax path: array in Flax layout} for every entry of ``key_map``; missing keys are left to
    ``reader.finish()``, shape mismatches (checkpoint vs model, in the checkpoint's layout) raise
    ConversionError."""
    flat, mismatched = {}, []
    for path, source in key_map.items():
        value = reader.take(source.torch_key)
        if value is None:
            continue
        expected = source.torch_shape(_leaf(abstract, path).shape)
        if tuple(value.shape) != expected:
            mismatched.append(
                f"{source.torch_key}: checkpoint {tuple(value.shape)} vs model {expected}"
            )
            continue
        flat[path] = np.ascontiguousarray(value.T) if source.transpose else value
    if mismatched:
        raise ConversionError(f"{name} does not match the model config:\n  shape mismatches: "
                              + "; ".join(mismatched[:20]))
    return flat


def state_dict_key_map(model_cfg: Any) -> dict[tuple[str, ...], KeySource]:
    """Flax parameter path -> official state-dict key, for every parameter of the tokenizer."""
    cfg: TokenizerConfig = validate(model_cfg)
    out: dict[tuple[str, ...], KeySource] = {}

    def linear(path, key):
        out[path + ("kernel",)] = KeySource(f"{key}.weight", transpose=True)
        out[path + ("bias",)] = KeySource(f"{key}.bias")

    def norm(path, key):
        out[path + ("scale",)] = KeySource(f"{key}.weight")
        out[path + ("bias",)] = KeySource(f"{key}.bias")

    def vit(part, depth):
        base = f"{part}.visual_model"
        for i in range(depth):
            path, key = (part, "layers", f"layers_{i}"), f"{base}.encoder.layers.{i}"
            norm(path + ("layer_norm1",), f"{key}.layer_norm1")
            norm(path + ("layer_norm2",), f"{key}.layer_norm2")
            for name in _BLOCK_LINEARS:
                linear(path + tuple(name.split(".")), f"{key}.{name}")
        norm((part, "post_layernorm"), f"{base}.post_layernorm")
        out[(part, "position_embedding")] = KeySource(
            f"{base}.embeddings.position_embedding.weight"
        )
        out[(part, "latent_pos_embed")] = KeySource(f"{part}.latent_pos_embed")

    vit("encoder", cfg.encoder.depth)
    linear(("encoder", "patch_embedding"), "encoder.visual_model.embeddings.patch_embedding")
    out[("encoder", "latent_tokens")] = KeySource("encoder.latent_tokens")
    out[("encoder", "refined_tokens")] = KeySource("encoder.refined_tokens")
    vit("decoder", cfg.decoder.depth)
    out[("decoder", "mask_token")] = KeySource("decoder.mask_token")
    linear(("decoder", "to_pixel"), "decoder.to_pixel.model")
    for name in ("quant_conv", "post_quant_conv", "refine_conv"):
        linear((name,), name)
    out[("quantizer", "codebook")] = KeySource("quantize.embedding.weight")
    return out


@dataclasses.dataclass
class TokenizerImport:
    params: Any                              # Flax parameter tree (numpy float32 leaves)
    skipped: list[str]                       # train-only keys not imported
    train_only: dict[str, np.ndarray] | None  # those tensors, when keep_train_only


def convert_tokenizer_state_dict(state: Mapping[str, np.ndarray], model_cfg: Any,
                                 keep_train_only: bool = False) -> TokenizerImport:
    """Maps every official key onto the Flax tree; ConversionError names missing / unexpected keys
    and shape mismatches (checkpoint shape vs model shape, in the checkpoint's layout)."""
    from detailflow_jax.tokenizer.model import abstract_params

    cfg = validate(model_cfg)
    abstract = abstract_params(cfg)
    key_map = state_dict_key_map(cfg)
    reader = StateDictReader(state, skip_prefixes=TRAIN_ONLY_PREFIXES, name="tokenizer checkpoint")
    flat = read_mapped(reader, key_map, abstract, "tokenizer checkpoint")
    skipped = reader.finish()
    params = assign_to_tree(flat, abstract, name="tokenizer checkpoint")
    train_only = {k: np.asarray(state[k]) for k in skipped} if keep_train_only else None
    return TokenizerImport(params, skipped, train_only)


def _leaf(tree, path):
    for key in path:
        if key not in tree:
            raise ConversionError(
                f"the model has no parameter {'/'.join(path)} (key map out of date?)"
            )
        tree = tree[key]
    return tree


def _summarize_skipped(skipped: list[str]) -> str:
    groups: dict[str, int] = {}
    for key in skipped:
        prefix = next(p for p in TRAIN_ONLY_PREFIXES if key.startswith(p))
        groups[prefix] = groups.get(prefix, 0) + 1
    return ", ".join(f"{p}* ({n} tensors)" for p, n in sorted(groups.items())) or "none"


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "official tokenizer state dict (.pt / .npz / "
                        ".safetensors)", flag_values=fv, required=True)
    flags.DEFINE_string("entry", None, "top-level entry of a wrapped checkpoint (default: 'model' "
                        "if present)", flag_values=fv)
    cli.define_config(fv)
    flags.mark_flag_as_required("config", flag_values=fv)
    cli.define_print_config(fv)
    cli.define_out(fv, "output orbax directory for the parameter tree")
    cli.define_force(fv)


def main(argv=None) -> None:
    from detailflow_jax.params_io import save_params
    from detailflow_jax.tokenizer.model import count_params

    f = cli.parse(argv, __doc__, _define_flags)
    config = cli.loaded_config(f)
    cli.maybe_print_config(config, f)
    state = load_state_dict(f.checkpoint, entry=f.entry)
    result = convert_tokenizer_state_dict(state, config.model)
    path = save_params(f.out, result.params, force=f.force)
    print(f"converted {f.checkpoint}: {len(state)} tensors, {count_params(result.params):,} "
          f"parameters -> {path}")
    print(f"skipped train-only tensors ({len(result.skipped)}): "
          f"{_summarize_skipped(result.skipped)}")


if __name__ == "__main__":
    cli_errors.run(main)
