"""Start-up checks for losses that need pretrained weights the user must supply (nothing is
downloaded)."""

from __future__ import annotations

import os

from detailflow_jax import storage
from detailflow_jax.params_io import restore_params


class MissingWeightsError(ValueError):
    """A loss is enabled but its converted weights were not given (or the path is not a converted
    directory)."""


def require_weights(name: str, path: str | os.PathLike | None, flag: str, converter: str) -> str:
    """Returns ``path`` as an absolute directory, or raises a MissingWeightsError saying what to
    pass.

    Args:
      name: what needs the weights, e.g. "perceptual loss LPIPS".
      path: the configured directory (None or "" when the user gave nothing).
      flag: the command-line flag that sets it, e.g. "--config.losses.lpips_weights".
      converter: the module that produces the directory, e.g. "detailflow_jax.convert.lpips".
    """
    how = f"{flag}=<dir converted by python -m {converter}>"
    if not path:
        raise MissingWeightsError(f"{name} needs {how} (or disable it in the config)")
    path = storage.path(path)
    if path.is_file():
        raise MissingWeightsError(
            f"{name}: {path} is a file, but {flag} takes the directory written by `python -m "
            f"{converter}`; "
            f"convert the file first (see `python -m {converter} --help`)"
        )
    if not path.is_dir():
        raise MissingWeightsError(f"{name}: {flag}={path} does not exist; pass {how}")
    return str(path)


def load_required_params(name: str, path, flag: str, converter: str):
    """``require_weights`` then restore the converted parameter tree."""
    return restore_params(require_weights(name, path, flag, converter))
