"""Saving and restoring a bare parameter tree as an orbax checkpoint (the output of every
converter)."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from detailflow_jax import storage


def save_params(path: str | os.PathLike, params: Any, force: bool = False) -> str:
    """Writes ``params`` to the orbax checkpoint directory ``path`` (absolute path or URI
    returned)."""
    path = storage.path(path)
    if path.exists() and not force:
        raise FileExistsError(
            f"{path} already exists; pass force=True (or --force) to overwrite it"
        )
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=force)
    return str(path)


def restore_params(path: str | os.PathLike, abstract: Any | None = None) -> Any:
    """Restores a tree saved by ``save_params``; with ``abstract`` (ShapeDtypeStructs with
    shardings) it is restored directly onto those shardings."""
    path = storage.path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no orbax parameter checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        if abstract is None:
            return ckptr.restore(path)
        return ckptr.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract))
