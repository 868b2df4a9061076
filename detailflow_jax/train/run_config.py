"""The ``config.json`` of a training work directory: checked before a resume, written only once the
state exists.

A resume with other model settings cannot restore the checkpoint (other shapes), and writing the new
config first would leave a work directory whose config no longer describes its checkpoints; so it is
refused before anything is touched. Other changed settings (steps, learning rate, logging) are
allowed and listed.
"""

from __future__ import annotations

import json
import logging

import ml_collections

from detailflow_jax import storage
from detailflow_jax.config_lib import ConfigError

log = logging.getLogger(__name__)

FILE = "config.json"
# Model fields that change how the model computes, not its parameters: a checkpoint restores under
# either value.
_COMPUTE_ONLY = ("dtype", "remat", "remat_policy")
_UNSET = "(unset)"


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _has_checkpoint(workdir: str) -> bool:
    directory = storage.path(workdir) / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def changes(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple[object, object]]:
    """{dotted key: (saved value, new value)} for every setting that differs (JSON values)."""
    old, new = _flat(saved), _flat(json.loads(config.to_json()))
    return {k: (old.get(k, _UNSET), new.get(k, _UNSET)) for k in sorted(old.keys() | new.keys())
            if old.get(k, _UNSET) != new.get(k, _UNSET)}


def _is_model_field(key: str) -> bool:
    return key.startswith("model.") and key.rsplit(".", 1)[-1] not in _COMPUTE_ONLY


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Before a run touches ``workdir``: raises ConfigError when its checkpoints were trained with
    other model settings; logs and returns the other changed settings ({} for a fresh start)."""
    path = storage.path(workdir) / FILE
    if not (path.is_file() and _has_checkpoint(workdir)):
        return {}
    diff = changes(storage.read_json(path), config)
    refused = [f"{k}={old}, you asked for {new}" for k, (old, new) in diff.items()
               if _is_model_field(k)]
    if refused:
        raise ConfigError(f"this workdir ({workdir}) was trained with {'; '.join(refused)}: pass "
                          "the same model settings to resume, or use another --workdir")
    if diff:
        log.warning("resuming %s with changed settings: %s", workdir,
                    ", ".join(f"{k} {old} -> {new}" for k, (old, new) in diff.items()))
    return diff


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes ``config.json`` (call once the state was initialised or restored)."""
    (storage.path(workdir) / FILE).write_text(config.to_json(indent=2))
