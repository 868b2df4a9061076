"""Reading PyTorch-style state dicts (.pt / .npz / .safetensors) and mapping them onto Flax trees.

Every converter in this package follows the same pattern:

    state = load_state_dict(path)                      # {torch_key: np.ndarray}
    reader = StateDictReader(state, skip_prefixes=...)  # tracks which keys were used
    flat = {("encoder", "layer_0", "kernel"): reader.linear_kernel("encoder.fc.weight"), ...}
    reader.finish()                                     # unexpected keys -> ConversionError
    params = assign_to_tree(flat, abstract_params)      # missing leaves / shape mismatches -> ConversionError
"""  # noqa: E501

from __future__ import annotations

import os
import zipfile
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from detailflow_jax import storage
from detailflow_jax.convert import pt_reader
from detailflow_jax.convert.errors import ConversionError

__all__ = ["ConversionError", "StateDictReader", "assign_to_tree", "leaf_shapes", "load_state_dict"]


def load_state_dict(path: str | os.PathLike, entry: str | None = None,
                    wrappers: Iterable[str] = ("model", "state_dict")) -> dict[str, np.ndarray]:
    """Loads ``{key: float32/int array}`` from a .pt/.pth/.bin, .npz or .safetensors file.

    ``.pt`` files are read by ``pt_reader`` (no torch needed, and the file's pickle runs no
    code); their floating-point tensors come back as float32, like torch's ``tensor.float()``.

    Args:
      path: the checkpoint file.
      entry: the top-level entry to read from a wrapped checkpoint (e.g. ``"ema"`` for GPT
        checkpoints). When None, the first of ``wrappers`` present is used, or the file itself when
        it is a flat state dict.
    """
    path = os.fspath(path)
    if not storage.path(path).exists():
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    path = storage.local_copy([path])[0]  # the readers below need random access to a local file
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        raw: Mapping[str, Any] = _load_npz(path)
    elif suffix == ".safetensors":
        raw = _load_safetensors(path)
    elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
        with pt_reader.open_pt(path) as ckpt:
            chosen = _unwrap(ckpt.tree, entry, tuple(wrappers), path)
            return {key: _as_float32(ckpt.materialize(value)) for key, value in chosen.items()}
    else:
        raise ConversionError(
            f"{path!r}: unknown checkpoint format {suffix!r}; use .pt, .npz or .safetensors"
        )
    chosen = _unwrap(raw, entry, tuple(wrappers), path)
    return {key: np.asarray(value) for key, value in chosen.items()}


def _is_floating(dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


def _as_float32(value: Any) -> np.ndarray:
    value = np.asarray(value)
    return value.astype(np.float32) if _is_floating(value.dtype) else value


def _load_npz(path: str) -> dict[str, np.ndarray]:
    # Checked before numpy sees it: numpy takes any non-zip file for a pickle and suggests
    # loading it unsafely.
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        truncated = head.startswith(b"PK")
        reason = ("the file is empty" if not head else
                  "a truncated zip archive" if truncated else "it is not a zip archive")
        raise _not_npz(path, reason)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # object arrays, bad members
        raise _not_npz(path, str(e)) from None


def _not_npz(path: str, reason: str) -> ConversionError:
    return ConversionError(f"{path} is not a numpy .npz archive of arrays ({reason}); write "
                           "one with numpy.savez(out, **state_dict)")


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{path} is not a readable .safetensors file ({e}); it may be "
                              "truncated, download it again") from None


def _unwrap(
    raw: Mapping[str, Any], entry: str | None, wrappers: tuple[str, ...], path: str
) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConversionError(
            f"{path!r} holds a {type(raw).__name__}, not a state dict {{name: tensor}}")
    if entry is not None:
        if entry not in raw or not isinstance(raw[entry], Mapping):
            raise ConversionError(
                f"{path!r} has no entry {entry!r}; top-level keys: {sorted(raw)[:20]}"
            )
        return raw[entry]
    for w in wrappers:
        if w in raw and isinstance(raw[w], Mapping):
            return raw[w]
    return raw


class StateDictReader:
    """Hands out state-dict tensors and remembers which were used, so leftovers can be reported."""

    def __init__(
        self,
        state: Mapping[str, np.ndarray],
        skip_prefixes: Iterable[str] = (),
        name: str = "checkpoint",
    ):
        self.state = dict(state)
        self.name = name
        self.skip_prefixes = tuple(skip_prefixes)
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.bad: list[str] = []  # wrong shape, dtype or values

    def has(self, key: str) -> bool:
        return key in self.state

    def take(
        self, key: str, shape: tuple[int, ...] | None = None, floating: bool = True
    ) -> np.ndarray:
        """The tensor ``key``; ``shape``: what the model expects, in the checkpoint's layout.
        Problems (a wrong shape, NaN/inf values, an integer tensor where weights are floats unless
        ``floating=False``) are collected and reported by ``finish()`` with the key."""
        if key not in self.state:
            self.missing.append(key)
            return None  # reported all together by finish()
        self.used.add(key)
        value = self.state[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            self.bad.append(
                f"{key}: checkpoint {tuple(value.shape)}, the model expects {tuple(shape)}"
            )
        if not _is_floating(value.dtype):
            if floating:
                self.bad.append(
                    f"{key}: {value.dtype} values where the model expects floating-point weights"
                )
        elif not np.isfinite(value).all():
            self.bad.append(
                f"{key}: {int(np.size(value) - np.isfinite(value).sum())} NaN/inf values"
            )
        return value

    def linear_kernel(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """PyTorch Linear.weight [out, in] -> Flax Dense kernel [in, out]; ``shape``: the expected
        [out, in]."""
        w = self.take(key, shape)
        return None if w is None else np.ascontiguousarray(w.T)

    def skipped(self) -> list[str]:
        return sorted(
            k for k in self.state if k not in self.used and k.startswith(self.skip_prefixes)
        )

    def finish(self) -> list[str]:
        """Raises on missing or unexpected keys; returns the keys skipped on purpose."""
        unexpected = sorted(
            k for k in self.state if k not in self.used and not k.startswith(self.skip_prefixes)
        )
        problems = []
        if self.missing:
            problems.append(f"missing keys ({len(self.missing)}): " + ", ".join(self.missing[:20]))
        if self.bad:
            problems.append(f"unusable tensors ({len(self.bad)}): " + "; ".join(self.bad[:20]))
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(
                f"{k} {tuple(self.state[k].shape)}" for k in unexpected[:20]))
        if problems:
            raise ConversionError(
                f"{self.name} does not match the model:\n  " + "\n  ".join(problems)
            )
        return self.skipped()


def assign_to_tree(
    flat: Mapping[tuple[str, ...], np.ndarray],
    abstract: Any,
    name: str = "checkpoint",
    dtype=np.float32,
) -> Any:
    """Builds a params tree shaped like ``abstract`` (e.g. from ``jax.eval_shape(model.init,
    ...)``).

    Every leaf of ``abstract`` must be provided, with the same shape; extra entries of ``flat`` are
    errors too.
    """
    abstract = nn.unbox(abstract)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    out, missing, mismatched = [], [], []
    expected = set()
    for path, leaf in leaves:
        key = tuple(_key_name(p) for p in path)
        expected.add(key)
        value = flat.get(key)
        if value is None:
            missing.append("/".join(key))
            out.append(None)
            continue
        value = np.asarray(value)
        if tuple(value.shape) != tuple(leaf.shape):
            mismatched.append(
                f"{'/'.join(key)}: checkpoint {tuple(value.shape)} vs model {tuple(leaf.shape)}"
            )
        out.append(value.astype(dtype) if np.issubdtype(value.dtype, np.floating) else value)
    extra = sorted("/".join(k) for k in flat if k not in expected)
    problems = []
    if missing:
        problems.append(
            f"model parameters with no checkpoint value ({len(missing)}): "
            + ", ".join(missing[:20])
        )
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched[:20]))
    if extra:
        problems.append(
            f"mapped values the model has no parameter for ({len(extra)}): " + ", ".join(extra[:20])
        )
    if problems:
        raise ConversionError(f"{name} does not match the model:\n  " + "\n  ".join(problems))
    return jax.tree_util.tree_unflatten(treedef, out)


def leaf_shapes(abstract: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{key path (as ``assign_to_tree`` matches it): shape} of every leaf of ``abstract``."""
    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]
    return {tuple(_key_name(p) for p in path): tuple(leaf.shape) for path, leaf in leaves}


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)
