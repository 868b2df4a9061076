"""The trainers' command line: ``--config path.py:arg``, ``--config.key=value``, ``--workdir``,
``--print_config`` on absl's global FLAGS; the plumbing itself is ``detailflow_jax.cli``.

Unknown config keys, values of the wrong type, a config file that does not load and the project's
own errors end with one line ``error: ...`` (exit status 2); ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import logging
import sys

from absl import flags
from absl import logging as absl_logging

from detailflow_jax import cli as shared
from detailflow_jax import cli_errors, storage
from detailflow_jax.config_lib import ConfigError

_CONFIG = shared.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "output directory (checkpoints, metrics, images); reused to resume")
_PRINT_CONFIG = shared.define_print_config()
_SHARED_FLAGS = ("config", "workdir", "print_config")


# --config's helpers, on the global FLAGS (their default)
loaded_config = shared.loaded_config
maybe_print_config = shared.maybe_print_config
require_fields = shared.require_fields


def parse(argv, doc: str):
    """(config, workdir) after flag parsing; a usage message when a required flag is missing."""
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save through absl at INFO
    config = loaded_config()
    if config is not None:
        maybe_print_config(config)
    if config is None or not _WORKDIR.value:
        print(doc.strip() + "\n", file=sys.stderr)
        cli_errors.fail("--config and --workdir are required")
    workdir = storage.path(_WORKDIR.value)
    if storage.is_uri(workdir):
        storage.check_bucket(workdir)
    elif workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {_WORKDIR.value!r} is a file; pass a directory (new, or a "
                          "run to resume)")
    return config, _WORKDIR.value


def train_main(doc: str, train_fn, fields: tuple[str, ...], what: str):
    """An absl main for ``train_fn(config, workdir)``; ``fields``: top-level config fields the
    trainer needs, ``what``: the kind of config, for the error when one is missing."""

    def main(argv) -> None:
        config, workdir = parse(argv, doc)
        require_fields(config, fields, what)
        train_fn(config, workdir)

    return main


def run(main, key_flags: tuple[str, ...] = _SHARED_FLAGS) -> None:
    """absl ``app.run`` with INFO logging, ``key_flags`` (default: --config, --workdir,
    --print_config) and --verbose in ``--help``, and the one-line error boundary."""
    shared.run(main, sys.modules["__main__"].__doc__ or "", key_flags, log_level=logging.INFO)
