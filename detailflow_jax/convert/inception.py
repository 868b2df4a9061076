"""Imports the pytorch-fid FID Inception-v3 weights (``pt_inception-2015-12-05-6726825d.pth``) into
``InceptionV3``.

The ``.pth`` is a plain PyTorch state dict (download it yourself from the pytorch-fid release page;
it is read without torch). A ``.npz``/``.safetensors`` with the same keys works too.

    python -m detailflow_jax.convert.inception --checkpoint pt_inception-2015-12-05-6726825d.pth --out DIR
"""  # noqa: E501

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from absl import flags

from detailflow_jax import cli, cli_errors, storage
from detailflow_jax.params_io import restore_params, save_params
from detailflow_jax.convert.state_dict import StateDictReader, assign_to_tree, load_state_dict
from detailflow_jax.nn.inception import abstract_params

# Flax leaf name -> PyTorch suffix (the module path is shared, "/" vs ".").
_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_key_and_layout(path: tuple[str, ...]) -> tuple[str, str]:
    """Maps a Flax param path to (torch key, layout) with layout in {"conv", "linear", "vector"}."""
    *module, leaf = path
    prefix = ".".join(module)
    if module[-1] == "bn":
        return f"{prefix}.{_BN_LEAVES[leaf]}", "vector"
    if leaf == "kernel":
        return f"{prefix}.weight", "conv" if module[-1] == "conv" else "linear"
    return f"{prefix}.{leaf}", "vector"


def convert_state_dict(state: dict[str, np.ndarray], name: str = "Inception checkpoint") -> Any:
    """PyTorch state dict of pytorch-fid's ``fid_inception_v3()`` -> ``InceptionV3`` params (fp32
    numpy tree)."""
    # BatchNorm counters carry no weights; AuxLogits exists only in torchvision-style dumps and is
    # unused for FID.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    reader = StateDictReader(state, skip_prefixes=("AuxLogits.",), name=name)
    abstract = abstract_params()
    flat = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]:
        key_path = tuple(p.key for p in path)
        torch_key, layout = _torch_key_and_layout(key_path)
        if layout == "linear":
            flat[key_path] = reader.linear_kernel(torch_key)
            continue
        value = reader.take(torch_key)
        if layout == "conv" and value is not None:
            value = value.transpose(2, 3, 1, 0)  # PyTorch conv [out, in, kh, kw] -> Flax HWIO
        flat[key_path] = value
    reader.finish()
    return assign_to_tree(flat, abstract, name=name)


def load_inception_params(path: str | os.PathLike) -> Any:
    """Inception params from an orbax directory written by this module's CLI, or from a state-dict
    file."""
    path = os.fspath(path)
    if storage.path(path).is_dir():
        return restore_params(path)
    return convert_state_dict(load_state_dict(path), name=os.path.basename(path))


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "pt_inception-2015-12-05-6726825d.pth, or a "
                        ".npz/.safetensors state dict", flag_values=fv, required=True)
    cli.define_out(fv, "output orbax directory")
    cli.define_force(fv)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(argv, __doc__, _define_flags)
    params = convert_state_dict(
        load_state_dict(args.checkpoint), name=os.path.basename(args.checkpoint)
    )
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"converted {n:,} parameters -> {save_params(args.out, params, force=args.force)}")


if __name__ == "__main__":
    cli_errors.run(main)
