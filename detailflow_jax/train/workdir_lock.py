"""One run per work directory: ``<workdir>/.lock`` names the run that holds it (host, process id,
start time).

A second run in the same directory stops with one line naming the holder. A lock left by a run that
died (its process id is not alive on this host) is taken over with a warning. The lock is released
when the trainer returns or raises, a SIGTERM/SIGINT stop included (the loop saves, then returns); a
``kill -9`` leaves it for the next run on the same host to take over. Limitation: a lock written
from another host cannot be checked for liveness (the message says to delete the file when that run
is gone), and on object stores (gs://) there is no atomic create, so two runs starting within the
same second may both proceed; the read-back after writing catches most such races. Only process 0 of
a multi-process run takes the lock.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import socket
import uuid
from typing import Callable

import jax
from etils import epath

from detailflow_jax import distributed
from detailflow_jax.config_lib import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class WorkdirBusyError(ConfigError):
    """Another run holds the work directory's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(path: epath.Path) -> dict | None:
    """The lock's content, or None when the file is unreadable (a run killed while writing it)."""
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) and {"host", "pid"} <= holder.keys() else None
    except (ValueError, UnicodeDecodeError):
        return None


def _describe(holder: dict) -> str:
    return f"pid {holder['pid']} on {holder['host']}, since {holder.get('since', '?')}"


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds ``workdir/.lock`` (created with the directory when
    needed)."""

    def __init__(self, workdir: str):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.token = uuid.uuid4().hex
        self._created_dir = False

    def acquire(self) -> None:
        host, pid = socket.gethostname(), os.getpid()
        if self.path.exists():
            holder = _holder(self.path)
            if holder is not None and not (
                holder["host"] == host and not _alive(int(holder["pid"]))
            ):
                raise WorkdirBusyError(
                    f"{self.path.parent} is in use by another run (lock {self.path}: "
                    f"{_describe(holder)}); wait "
                    f"for it to end, use another --workdir, or delete {self.path} if that run is "
                    "gone"
                )
            log.warning("taking over the lock %s left by a run that is gone (%s)", self.path,
                        _describe(holder) if holder else "unreadable")
        elif not self.path.parent.exists():
            self.path.parent.mkdir(parents=True)
            self._created_dir = True
        since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.path.write_text(
            json.dumps({"host": host, "pid": pid, "since": since, "token": self.token})
        )
        holder = _holder(self.path)
        # another run wrote it at the same moment
        if holder is None or holder.get("token") != self.token:
            raise WorkdirBusyError(
                f"{self.path.parent} is in use by another run that started at the same time "
                f"(lock {self.path}: {_describe(holder) if holder else 'unreadable'})"
            )

    def release(self) -> None:
        holder = _holder(self.path) if self.path.exists() else None
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink()
            if self._created_dir and not any(self.path.parent.iterdir()):
                # a run that failed before writing anything leaves no trace
                self.path.parent.rmdir()

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holds_workdir(train: Callable) -> Callable:
    """``train(config, workdir, ...)`` run while holding ``workdir``'s lock (process 0 takes it)."""

    @functools.wraps(train)
    def locked(config, workdir: str, *args, **kwargs):
        # before jax.process_index(), which would start a one-process backend
        distributed.maybe_initialize()
        if jax.process_index() != 0:
            return train(config, workdir, *args, **kwargs)
        with WorkdirLock(workdir):
            return train(config, workdir, *args, **kwargs)

    return locked
