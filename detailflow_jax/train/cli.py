"""Command-line plumbing shared by the commands: ``--config path.py:arg``, ``--config.key=value``, ``--workdir``.

Unknown config keys and values of the wrong type are rejected by ml_collections with the key named; the message is
shown without a traceback.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from detailflow_jax.config_lib import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, images); reused to resume")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print the config (after the --config.key=value overrides) "
                                  "as JSON and exit without running")


def maybe_print_config(config) -> None:
    """With --print_config: prints ``config`` as JSON and exits (checks a command line without running it)."""
    if _PRINT_CONFIG.value:
        print(config.to_json(indent=2))
        sys.exit(0)


def parse(argv, doc: str):
    """(config, workdir) after flag parsing; exits with a usage message when a required flag is missing."""
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save through absl at INFO
    if _CONFIG.value is not None:
        maybe_print_config(_CONFIG.value)
    if _CONFIG.value is None or not _WORKDIR.value:
        sys.exit(f"{doc.strip()}\n\nerror: --config and --workdir are required")
    return _CONFIG.value, _WORKDIR.value


def train_main(doc: str, train_fn):
    """An absl main for ``train_fn(config, workdir)``: config mistakes end with one line, not a traceback."""

    def main(argv) -> None:
        config, workdir = parse(argv, doc)
        try:
            train_fn(config, workdir)
        except ConfigError as e:
            sys.exit(f"config error: {e}")

    return main


def run(main) -> None:
    """absl ``app.run`` with INFO logging and config errors shown as one line instead of a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}\nPass --help for the flags.")
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        # ml_collections raises these for an override of a key that does not exist or of the wrong type.
        overrides = [a for a in argv if a.startswith("--config.")]
        sys.exit(f"config error: {e} (in {' '.join(overrides) or 'the --config file'}); check the key against the "
                 "config file's fields and the value's type")
