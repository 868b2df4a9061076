"""Command-line plumbing of every command, in one style (absl flags).

``--config FILE.py[:ARG]`` with ``--config.key=value`` overrides, ``--print_config``, ``--verbose``
and ``--help`` read the same everywhere, and a bad flag, an unknown config key, a value of the wrong
type, a config file that does not load and the project's own errors end with one line
``error: ...`` (exit status 2, ``detailflow_jax.cli_errors``); ``--verbose`` adds the traceback.

Two ways in: the trainers define their flags on absl's global FLAGS and start with ``run``; the
other commands build a fresh set of flags per call of ``main(argv)`` (``parse``), so tests can call
several commands in one process without their flags colliding or leaking values.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable, Iterable

from absl import flags
from ml_collections import config_flags

from detailflow_jax import cli_errors
from detailflow_jax.config_lib import ConfigError

FLAGS = flags.FLAGS
CONFIG_HELP = "configs/<file>.py[:arg]"
PRINT_CONFIG_HELP = ("print the config (after the --config.key=value overrides) as JSON and exit "
                     "without running")
VERBOSE_HELP = ("on an error, print the traceback as well as the one-line message (also "
                f"{cli_errors.VERBOSE_ENV}=1)")
HIDDEN = "(not listed: for tests)"
HELP_ARGS = ("--help", "-help", "-h", "--helpshort", "-?")


def define_config(fv: flags.FlagValues = FLAGS, name: str = "config", default: str | None = None,
                  help: str = CONFIG_HELP) -> flags.FlagHolder:
    """``--NAME FILE.py[:ARG]`` and its ``--NAME.key=value`` overrides, as the trainers take it."""
    return config_flags.DEFINE_config_file(name, default, help, flag_values=fv, lock_config=True)


def define_print_config(fv: flags.FlagValues = FLAGS) -> flags.FlagHolder:
    return flags.DEFINE_bool("print_config", False, PRINT_CONFIG_HELP, flag_values=fv)


def define_verbose(fv: flags.FlagValues = FLAGS) -> None:
    """``--verbose`` in ``--help``; cli_errors takes it off the command line before parsing."""
    if "verbose" not in fv:
        flags.DEFINE_bool("verbose", False, VERBOSE_HELP, flag_values=fv)


def define_out(fv: flags.FlagValues, help: str, required: bool = True) -> None:
    flags.DEFINE_string("out", None, help, flag_values=fv, required=required)


def define_force(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("force", False, "overwrite --out if it exists", flag_values=fv)


def define_tokenizer_config(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("tokenizer_config", None, "tokenizer config FILE.py:ARG (needed for a "
                        "converted directory)", flag_values=fv)


def define_gpt_config(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("gpt_config", None, "GPT config FILE.py:ARG (needed for a converted "
                        "directory)", flag_values=fv)


def define_hidden_integer(fv: flags.FlagValues, name: str) -> None:
    """An integer flag that ``--help`` does not list (a hook for tests)."""
    flags.DEFINE_integer(name, None, HIDDEN, flag_values=fv)


def _config_name(fv: flags.FlagValues, name: str) -> str:
    return repr(fv[name].config_filename)


def loaded_config(fv: flags.FlagValues = FLAGS, name: str = "config"):
    """The --NAME value, or None; raises ConfigError (one line) when the file did not load."""
    config = fv[name].value
    if type(config).__name__ == "_ErrorConfig":  # ml_collections defers a load failure to its use
        error = object.__getattribute__(config, "_error")
        reason = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
        raise ConfigError(f"--{name} {_config_name(fv, name)} did not load: {reason}")
    return config


def maybe_print_config(config, fv: flags.FlagValues = FLAGS) -> None:
    """With --print_config: prints ``config`` as JSON and exits (checks a command line)."""
    if fv["print_config"].value:
        print(config.to_json(indent=2))
        sys.exit(0)


def require_fields(config, fields: tuple[str, ...], what: str, fv: flags.FlagValues = FLAGS,
                   name: str = "config") -> None:
    """ConfigError when ``config`` lacks top-level ``fields`` (e.g. an AR config given to the
    tokenizer trainer)."""
    missing = [f for f in fields if f not in config]
    if missing:
        raise ConfigError(f"--{name} {_config_name(fv, name)} is not {what}: it has no "
                          f"{', '.join(missing)}")


def print_help(doc: str, fv: flags.FlagValues = FLAGS) -> None:
    """The command's docstring, then its key flags, as absl's ``--help`` lays them out."""
    print(doc.rstrip() + "\n\nflags:\n" + fv.main_module_help() + "\n")


def wants_help(argv: Iterable[str]) -> bool:
    return any(a in HELP_ARGS for a in argv)


def run(
    main: Callable, doc: str, key_flags: Iterable[str] = (), log_level: int | None = None
) -> None:
    """absl ``app.run`` of a global-FLAGS command: ``key_flags`` (shared flags defined elsewhere)
    and --verbose listed in ``--help``, and the one-line error boundary; ``log_level``: Python
    logging to stderr from that level (commands that log progress, e.g. logging.INFO)."""
    from absl import app
    if log_level is not None:
        logging.basicConfig(
            level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    define_verbose()
    for name in (*key_flags, "verbose"):  # --help lists the main module's key flags only
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
    cli_errors.take_verbose_flag()
    if wants_help(sys.argv[1:]):
        print_help(doc)
        sys.exit(0)
    app.run(cli_errors.guard(main), flags_parser=parse_flags)


def parse(argv: list[str] | None, doc: str, define: Callable[[flags.FlagValues], object],
          aliases: dict[str, str] | None = None) -> flags.FlagValues:
    """A fresh set of the flags that ``define`` makes, parsed from ``argv`` (default: the command
    line), with --verbose and --help; ``aliases``: old flag spellings -> names (``batch-size``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = [_respell(a, aliases or {}) for a in args if a != cli_errors.VERBOSE_FLAG]
    fv = flags.FlagValues()
    with _flag_errors([sys.argv[0], *args]):  # a --config default loads (with overrides) here
        define(fv)
    define_verbose(fv)
    for flag in {fv[name] for name in fv if fv[name].help != HIDDEN}:  # --help lists these
        fv.register_key_flag_for_module(sys.argv[0], flag)
    if wants_help(args):
        print_help(doc, fv)
        sys.exit(0)
    parse_flags([sys.argv[0], *args], fv)
    return fv


def _respell(arg: str, aliases: dict[str, str]) -> str:
    for old, new in aliases.items():
        for prefix in (f"--{old}", f"-{old}"):
            if arg == prefix or arg.startswith(prefix + "="):
                return "--" + new + arg[len(prefix):]
    return arg


def parse_flags(argv: list[str], fv: flags.FlagValues = FLAGS) -> list[str]:
    """``fv(argv)`` with a bad flag or config override as one line ``error: ...``."""
    with _flag_errors(argv):
        return fv(argv)


@contextlib.contextmanager
def _flag_errors(argv: list[str]):
    """``sys.argv`` is ``argv`` (ml_collections finds the --config.key=value overrides there); a
    bad flag or override ends with one line ``error: ...``."""
    saved, sys.argv = sys.argv, list(argv)
    try:
        yield
    except flags.Error as e:
        cli_errors.fail(f"{_message(e)} (pass --help for the flags)")
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        # ml_collections raises these for an override of a missing key or of the wrong type.
        overrides = " ".join(a for a in argv[1:] if a.startswith("--")
                             and "." in a.split("=")[0]) or "the --config file"
        cli_errors.fail(f"{_message(e)} (in {overrides}); check the key against the config file's "
                        "fields and the value's type")
    finally:
        sys.argv = saved


def _message(error: Exception) -> str:
    """The message of ``error``; for a config file that raised, the last line of the traceback that
    ml_collections puts into it, without the exception's class name."""
    text = str(error)
    if "Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name, _, message = last.partition(": ")
    return message if message and name.replace(".", "").isidentifier() else last
