r"""Import an official DetailFlow / LlamaGen GPT checkpoint into the Flax `GPT` params tree.

    python -m detailflow_jax.convert.gpt --checkpoint GPT-L-128.pt [--entry ema] \
        --config configs/gpt.py:L/128 --out /tmp/gpt_l_128

Key map (PyTorch `Linear.weight` is [out, in], a Flax kernel [in, out]):

    cls_embedding.embedding_table.weight          -> cls_embedding/embedding
    tok_embeddings.weight                         -> tok_embeddings/embedding
    spe_tok_embeddings.special_embeddings.weight  -> spe_tok_embeddings
    layers.{i}.attention.wqkv.weight              -> layers_{i}/attention/wqkv/kernel     (rows [q; k; v])
    layers.{i}.attention.wo.weight                -> layers_{i}/attention/wo/kernel
    layers.{i}.feed_forward.w{1,2,3}.weight       -> layers_{i}/feed_forward/w{1,2,3}/kernel
    layers.{i}.{attention,ffn}_norm.weight        -> layers_{i}/{attention,ffn}_norm/scale
    norm.weight / output.weight                   -> norm/scale / output/kernel

With `scan_layers` the per-layer arrays are stacked on a leading axis under `layers/...`.
"""  # noqa: E501

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from absl import flags

from detailflow_jax import cli, cli_errors, config_lib
from detailflow_jax.ar.model import GPT, GPTConfig, init_params
from detailflow_jax.convert.state_dict import (
    ConversionError,
    StateDictReader,
    assign_to_tree,
    leaf_shapes,
    load_state_dict,
)

_GLOBAL_KEYS = {
    ("cls_embedding", "embedding"): ("cls_embedding.embedding_table.weight", False),
    ("tok_embeddings", "embedding"): ("tok_embeddings.weight", False),
    ("spe_tok_embeddings",): ("spe_tok_embeddings.special_embeddings.weight", False),
    ("norm", "scale"): ("norm.weight", False),
    ("output", "kernel"): ("output.weight", True),
}
_LAYER_KEYS = {
    ("attention", "wqkv", "kernel"): ("attention.wqkv.weight", True),
    ("attention", "wo", "kernel"): ("attention.wo.weight", True),
    ("feed_forward", "w1", "kernel"): ("feed_forward.w1.weight", True),
    ("feed_forward", "w2", "kernel"): ("feed_forward.w2.weight", True),
    ("feed_forward", "w3", "kernel"): ("feed_forward.w3.weight", True),
    ("attention_norm", "scale"): ("attention_norm.weight", False),
    ("ffn_norm", "scale"): ("ffn_norm.weight", False),
}


def convert_gpt_state_dict(
    state: Mapping[str, np.ndarray], cfg: GPTConfig, name: str = "GPT checkpoint"
) -> Any:
    """{torch key: array} -> Flax params for `GPT(cfg)`. Missing/unexpected keys, wrong shapes (in
    the checkpoint's layout), NaN/inf values and integer tensors raise ConversionError naming the
    checkpoint key."""
    abstract = jax.eval_shape(lambda: init_params(GPT(cfg), jax.random.key(0)))
    shapes = leaf_shapes(abstract)

    def expected(path: tuple[str, ...], linear: bool) -> tuple[int, ...] | None:
        """The checkpoint-layout shape of the Flax leaf at ``path`` ([out, in] for a Linear
        weight)."""
        shape = shapes.get(path)
        if shape is None and path[0].startswith("layers_") and cfg.scan_layers:
            shape = shapes[("layers",) + path[1:]][1:]
        return None if shape is None else tuple(reversed(shape)) if linear else shape

    reader = StateDictReader(state, name=name)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for path, (key, linear) in _GLOBAL_KEYS.items():
        flat[path] = (reader.linear_kernel if linear else reader.take)(key, expected(path, linear))
    n_layer = _checkpoint_layers(state)
    per_layer = {path: [] for path in _LAYER_KEYS}
    for i in range(n_layer):
        for path, (suffix, linear) in _LAYER_KEYS.items():
            take = reader.linear_kernel if linear else reader.take
            per_layer[path].append(
                take(f"layers.{i}.{suffix}", expected((f"layers_{i}",) + path, linear))
            )
    reader.finish()
    if n_layer != cfg.n_layer:
        raise ConversionError(
            f"{name} has {n_layer} layers (layers.0 .. layers.{n_layer - 1}) but the config has "
            f"n_layer={cfg.n_layer}; pick the matching variant"
        )
    for path, arrays in per_layer.items():
        if cfg.scan_layers:
            flat[("layers",) + path] = np.stack(arrays)
        else:
            for i, a in enumerate(arrays):
                flat[(f"layers_{i}",) + path] = a
    return assign_to_tree(flat, abstract, name=name)


def _checkpoint_layers(state: Mapping[str, np.ndarray]) -> int:
    ids = {
        int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.split(".")[1].isdigit()
    }
    return max(ids) + 1 if ids else 0


def load_gpt_checkpoint(path: str, cfg: GPTConfig, entry: str | None = None) -> Any:
    """Reads a .pt/.npz/.safetensors GPT checkpoint (the `model` entry by default, or e.g.
    `ema`)."""
    return convert_gpt_state_dict(load_state_dict(path, entry), cfg, name=os.path.basename(path))



def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "official GPT checkpoint (.pt, .npz or .safetensors)",
                        flag_values=fv, required=True)
    flags.DEFINE_string("entry", None, "top-level entry to read, e.g. 'ema' (default: 'model')",
                        flag_values=fv)
    cli.define_config(fv, default=config_lib.config_path("configs/gpt.py") + ":L/128")
    cli.define_print_config(fv)
    cli.define_out(fv, "output orbax parameter directory")
    cli.define_force(fv)


def main(argv=None) -> str:
    args = cli.parse(argv, __doc__, _define_flags)
    from detailflow_jax.params_io import save_params
    config = cli.loaded_config(args)
    cli.maybe_print_config(config, args)
    cfg = GPTConfig(**config.model).validate()
    params = jax.tree.map(jnp.asarray, load_gpt_checkpoint(args.checkpoint, cfg, args.entry))
    out = save_params(args.out, params, force=args.force)
    print(
        f"wrote {sum(x.size for x in jax.tree_util.tree_leaves(params)):,} GPT parameters to {out}"
    )
    return out


if __name__ == "__main__":
    cli_errors.run(main)
