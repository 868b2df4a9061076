"""Helpers for ``configs/*.py``: big_vision-style argument strings and validation errors that name
the key."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

# The repository (or installed tree) holding configs/: relative config paths not found from the
# working directory are looked up here, so defaults like "configs/gpt.py" work from anywhere.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(ValueError):
    """A config value that breaks a rule; the message names the key, its value and the rule."""


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
    """Parses ``"N=128,g=8,smoke"`` against defaults ``spec`` (big_vision semantics).

    ``key=value`` is cast to the default's type; a bare ``key`` sets a bool default to True. Unknown
    keys are errors unless ``lazy``. A bare word that is not a bool key is kept as ``variant`` when
    ``spec`` has a ``variant``.
    """
    out = ml_collections.ConfigDict(dict(spec))
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        if "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
            if key not in spec:
                if not lazy:
                    raise ConfigError(
                        f"unknown config argument {key!r} in {arg!r}; known: {sorted(spec)}"
                    )
                out[key] = value
                continue
            default = spec[key]
            try:
                if isinstance(default, bool):
                    if value.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(value)
                    out[key] = value.lower() in ("true", "1")
                elif default is None:
                    out[key] = value
                else:
                    out[key] = type(default)(value)
            except ValueError:
                raise ConfigError(
                    f"config argument {key}={value!r} in {arg!r}: expected a "
                    f"{type(default).__name__}"
                ) from None
        elif isinstance(spec.get(part), bool):
            out[part] = True
        elif "variant" in spec:
            out.variant = part
        else:
            raise ConfigError(f"unknown config flag {part!r} in {arg!r}; known: {sorted(spec)}")
    return out


def config_path(path: str) -> str:
    """``path`` as given when it exists (or is absolute), else the same relative path under
    REPO_ROOT if that exists there."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(REPO_ROOT, path)
    return candidate if os.path.exists(candidate) else path


def override(config: ml_collections.ConfigDict, **dotted) -> ml_collections.ConfigDict:
    """Sets ``{"optim.lr": 1e-3, ...}`` (dotted keys, as on the command line) in place; returns
    ``config``."""
    for key, value in dotted.items():
        target = config
        *parents, leaf = key.split(".")
        for part in parents:
            target = target[part]
        target[leaf] = value
    return config


def require(condition: bool, key: str, value, rule: str) -> None:
    """Raises ConfigError("<key>=<value>: <rule>") when ``condition`` is false."""
    if not condition:
        raise ConfigError(f"{key}={value!r}: {rule}")


def load_config_file(spec: str):
    """'path/to/config.py:ARG' -> get_config(ARG) of that file."""
    path, _, arg = spec.partition(":")
    path = config_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} (from --config {spec!r}) does not exist")
    module_spec = importlib.util.spec_from_file_location("_gpt_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
