"""Orbax checkpoints of (train state, data iterator) with keep-N, async writes, checksums and
preemption-safe resume.

A thin wrapper over the v0 ``CheckpointManager`` so a later move to orbax v1 stays local to this
file.

Checksums. Once a step's files are final (at the next save, ``wait`` or ``close``), every process
writes ``<step>/sha256.process_<i>.json``: size and SHA-256 of the files it wrote (those under a
``process_<i>`` path component; process 0 also covers the shared ones). A resume checks them before
restoring and, after restoring, that every floating-point value is finite; a step that fails (a file
truncated, garbled or missing, a flipped bit, an empty step folder, a restore error) is named in a
warning, moved aside to ``<step>.damaged`` by a trainer (nothing is deleted), and the next older
step is tried. A step without checksum files (written before they existed, or killed before they
were written) is restored unchecked. Each process verifies its own files and the processes agree on
the verdict before anything is restored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
import threading
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from detailflow_jax import storage

log = logging.getLogger(__name__)

CHECKSUM_FILE = "sha256.process_{}.json"
DAMAGED_SUFFIX = ".damaged"
_PROCESS_COMPONENT = re.compile(r"(?:^|[._])process_(\d+)(?:$|[-._])")


class CheckpointError(RuntimeError):
    """No checkpoint of a directory that has some could be restored intact."""


def _owner(relative: str) -> int:
    """The process that wrote a file of a step folder: the ``process_<i>`` in its path, else process
    0."""
    for part in relative.split("/"):
        match = _PROCESS_COMPONENT.search(part)
        if match:
            return int(match.group(1))
    return 0


def _sha256(path: epath.Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files_under(folder: epath.Path, prefix: str = ""):
    """(path relative to ``folder``, path) of every file below it. Built from ``iterdir`` names
    rather than ``walk``, whose folders come back in another spelling on a bucket (no ``gs://``), so
    ``relative_to`` fails."""
    for child in folder.iterdir():
        if child.is_dir():
            yield from _files_under(child, f"{prefix}{child.name}/")
        else:
            yield prefix + child.name, child


def _step_files(step_dir: epath.Path, process: int) -> dict[str, epath.Path]:
    """{path relative to the step folder: path} of the files ``process`` wrote (checksum files
    excluded)."""
    return {relative: path for relative, path in _files_under(step_dir)
            if not relative.startswith("sha256.process_") and _owner(relative) == process}


def write_checksums(step_dir: epath.Path, process: int | None = None) -> None:
    """Writes ``sha256.process_<i>.json`` for the files this process wrote into a finished step
    folder."""
    process = jax.process_index() if process is None else process
    sums = {
        rel: [path.stat().length, _sha256(path)]
        for rel, path in sorted(_step_files(step_dir, process).items())
    }
    target = step_dir / CHECKSUM_FILE.format(process)
    tmp = target.parent / (target.name + ".tmp")
    tmp.write_text(json.dumps(sums, indent=0))
    tmp.rename(target)


def checksum_problem(step_dir: epath.Path, process: int | None = None) -> str | None:
    """Why this process's files of ``step_dir`` do not match their checksums (None: they match, or
    the step has no checksum file to check against)."""
    process = jax.process_index() if process is None else process
    listing = step_dir / CHECKSUM_FILE.format(process)
    if not listing.exists():
        return None
    try:
        sums = json.loads(listing.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"its checksum file {listing.name} is garbled"
    for rel, (size, digest) in sums.items():
        path = step_dir / rel
        if not path.exists():
            return f"{rel} is missing"
        actual = path.stat().length
        if actual != size:
            return f"{rel} has {actual} bytes, {size} were written"
        if _sha256(path) != digest:
            return f"{rel} does not match its SHA-256 (the bytes changed after it was written)"
    return None


def _agreed(problem: str | None) -> str | None:
    """Every process's verdict combined: the first problem any process found (one-process runs: as
    is)."""
    if jax.process_count() == 1:
        return problem
    bad = multihost_utils.process_allgather(np.int32(problem is not None))
    if problem is None and bad.any():
        return f"process {int(np.argmax(bad))} found a damaged file"
    return problem


def non_finite_entries(tree: Any) -> list[str]:
    """Paths of the floating-point leaves of ``tree`` holding NaN or inf."""
    leaves = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return []
    finite = jax.jit(lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))(
        [x for _, x in leaves]
    )
    return [name for (name, _), ok in zip(leaves, np.asarray(jax.device_get(finite))) if not ok]


class Checkpointer:
    """Saves ``state`` (any pytree of jax arrays) and, optionally, a grain iterator under
    ``directory/<step>/``."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = storage.path(directory)  # a bucket URI reaches orbax as it is
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        # the step saved last, whose checksums are not written yet
        self._unsealed: int | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    def save(self, step: int, state: Any, data_iter: Any | None = None, force: bool = True) -> None:
        self._seal()
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        if self.manager.save(int(step), args=ocp.args.Composite(**items), force=force):
            self._unsealed = int(step)

    def _seal(self) -> None:
        """Waits for the last save to finish and writes its checksums."""
        self.manager.wait_until_finished()
        if self._unsealed is not None and self.step_dir(self._unsealed).exists():
            write_checksums(self.step_dir(self._unsealed))
        self._unsealed = None

    def restore_newest(self, read: Callable[[int], Any], step: int | None = None,
                       move_damaged: bool = False) -> tuple[int, Any]:
        """(step, ``read(step)``) for the newest step whose checksums match, that reads without
        error and holds only finite values (``step``: that one only). Damaged steps are named in a
        warning and, with ``move_damaged`` (the trainer that owns the directory), renamed to
        ``<step>.damaged``."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        damaged = []
        for candidate in steps:
            problem, value = _agreed(checksum_problem(self.step_dir(candidate))), None
            if problem is None:
                try:
                    value = read(candidate)
                except Exception as e:  # noqa: BLE001 - any reader failure makes the step unusable; reported
                    problem = (
                        f"it does not restore: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
                    )
            if problem is None:
                bad = non_finite_entries(value)
                problem = f"it holds NaN/inf in {', '.join(bad[:5])}" if bad else None
            if problem is None:
                if damaged and move_damaged:
                    self._move_aside(damaged)
                return candidate, value
            log.warning(
                "checkpoint step %d in %s is damaged (%s); trying the previous one",
                candidate,
                self.directory,
                problem,
            )
            damaged.append((candidate, problem))
        raise CheckpointError(
            f"no intact checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {p}" for s, p in damaged)
            + ". Restore the files, or start again in another --workdir"
        )

    def _move_aside(self, damaged: list[tuple[int, str]]) -> None:
        if jax.process_index() == 0:
            for step, _ in damaged:
                target = epath.Path(self.directory) / f"{step}{DAMAGED_SUFFIX}"
                while target.exists():
                    target = target.parent / (target.name + "_")
                self.step_dir(step).rename(target)
                log.warning("moved damaged checkpoint step %d to %s", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoint: damaged steps moved")
        self.manager.reload()

    def restore(
        self, abstract_state: Any, data_iter: Any | None = None, step: int | None = None
    ) -> Any:
        """Restores the newest intact step (see ``restore_newest``) onto the shardings carried by
        ``abstract_state`` (ShapeDtypeStructs or arrays); the data iterator, when given, is restored
        in place. ``self.restored_step`` tells which step it was."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)

        def read(candidate: int) -> Any:
            items = {"state": ocp.args.StandardRestore(target)}
            if data_iter is not None:
                items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
            return self.manager.restore(candidate, args=ocp.args.Composite(**items))["state"]

        self.restored_step, state = self.restore_newest(read, step, move_damaged=True)
        return state

    def wait(self) -> None:
        self._seal()

    def close(self) -> None:
        self._seal()
        self.manager.close()


class StopRequest:
    """Set by SIGTERM/SIGINT (preemption, scancel, Ctrl-C) so the loop can save and exit at the next
    step."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        self._event.set()

    def request(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()
