"""The error boundary of every command: a mistake in the input ends with one line, not a traceback.

The project's own errors (a config value, a missing file or weights, a diverged run, ...) print
``error: <message>`` on stderr and exit with status 2. ``--verbose`` anywhere on the command line
(or DETAILFLOW_VERBOSE=1) prints the full traceback as well. Any other exception is a bug and keeps
its traceback.

    if __name__ == "__main__":
        cli_errors.run(main)     # main(argv=None) parses its flags with detailflow_jax.cli.parse;
                                 # the trainers (global absl FLAGS) go through train/cli.py run()
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, NoReturn

EXIT_STATUS = 2
VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "DETAILFLOW_VERBOSE"

# Module -> the errors it raises for bad input. Only modules already imported are looked up: an
# error can only come from a module the command has loaded, and importing the others costs seconds.
_PROJECT_ERRORS = {
    "detailflow_jax.config_lib": ("ConfigError",),  # sharding.MeshError is one
    "detailflow_jax.losses.weights": ("MissingWeightsError",),
    "detailflow_jax.train.metrics": ("NonFiniteLossError",),
    "detailflow_jax.checkpoint": ("CheckpointError",),
    "detailflow_jax.train.workdir_lock": ("WorkdirBusyError",),
    "detailflow_jax.data.fashion_mnist": ("FashionMnistError",),
    "detailflow_jax.data.imagefolder": ("ImageFolderError",),
    "detailflow_jax.eval.evaluate": ("ResumeError",),
    "detailflow_jax.convert.state_dict": ("ConversionError",),
}
# A path from the command line that is missing, a file instead of a directory, or not readable.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def project_errors() -> tuple[type[BaseException], ...]:
    found = [getattr(sys.modules[name], cls) for name, classes in _PROJECT_ERRORS.items()
             if name in sys.modules for cls in classes]
    return (*found, *_PATH_ERRORS)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def take_verbose_flag() -> None:
    """Removes ``--verbose`` from sys.argv (before any parser sees it); remembers it in the env."""
    if VERBOSE_FLAG in sys.argv[1:]:
        sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a != VERBOSE_FLAG]
        os.environ[VERBOSE_ENV] = "1"


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def fail(message: object) -> NoReturn:
    """Prints ``error: <message>`` (one line) on stderr and exits with EXIT_STATUS."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(EXIT_STATUS)


def guard(main: Callable) -> Callable:
    """``main`` with the project's errors turned into one line (the traceback only when verbose)."""

    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except project_errors() as e:
            if verbose():
                traceback.print_exc()
            fail(e)

    return guarded


def run(main: Callable[[], object]) -> None:
    """Entry point of a command whose ``main()`` parses sys.argv itself (``cli.parse``)."""
    take_verbose_flag()
    guard(main)()
