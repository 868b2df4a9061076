"""Command-line plumbing shared by the absl commands: ``--config path.py:arg``,
``--config.key=value``, ``--workdir``, ``--print_config``, and the error boundary
(``detailflow_jax.cli_errors``).

Unknown config keys, values of the wrong type, a config file that does not load and the project's
own errors end with one line ``error: ...`` (exit status 2); ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from detailflow_jax import cli_errors, storage
from detailflow_jax.config_lib import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "output directory (checkpoints, metrics, images); reused to resume")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print the config (after the "
                                  "--config.key=value overrides) as JSON and exit without running")
_SHARED_FLAGS = ("config", "workdir", "print_config")


def _config_name() -> str:
    return repr(flags.FLAGS["config"].config_filename)


def loaded_config():
    """The --config value, or None; raises ConfigError (one line) when the file did not load."""
    config = _CONFIG.value
    if type(config).__name__ == "_ErrorConfig":  # ml_collections defers a load failure to its use
        error = object.__getattribute__(config, "_error")
        reason = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
        raise ConfigError(f"--config {_config_name()} did not load: {reason}")
    return config


def maybe_print_config(config) -> None:
    """With --print_config: prints ``config`` as JSON and exits (checks a command line)."""
    if _PRINT_CONFIG.value:
        print(config.to_json(indent=2))
        sys.exit(0)


def require_fields(config, fields: tuple[str, ...], what: str) -> None:
    """ConfigError when ``config`` lacks top-level ``fields`` (e.g. an AR config given to the
    tokenizer trainer)."""
    missing = [f for f in fields if f not in config]
    if missing:
        raise ConfigError(f"--config {_config_name()} is not {what}: it has no "
                          f"{', '.join(missing)}")


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


def run(main) -> None:
    """absl ``app.run`` with INFO logging, --config/--workdir in ``--help``, and the one-line error
    boundary."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _SHARED_FLAGS:  # --help lists the main module's key flags only
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    cli_errors.take_verbose_flag()
    app.run(cli_errors.guard(main), flags_parser=_parse_flags)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        cli_errors.fail(f"{_message(e)} (pass --help for the flags)")
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        # ml_collections raises these for an override of a missing key or of the wrong type.
        overrides = " ".join(a for a in argv if a.startswith("--config.")) or "the --config file"
        cli_errors.fail(f"{_message(e)} (in {overrides}); check the key against the config file's "
                        "fields and the value's type")


def _message(error: Exception) -> str:
    """The message of ``error``; for a config file that raised, the last line of the traceback that
    ml_collections puts into it, without the exception's class name."""
    text = str(error)
    if "Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name, _, message = last.partition(": ")
    return message if message and name.replace(".", "").isidentifier() else last
