"""Orbax checkpoints of (train state, data iterator) with keep-N, async writes and preemption-safe resume.

A thin wrapper over the v0 ``CheckpointManager`` so a later move to orbax v1 stays local to this file.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from detailflow_jax import storage


class Checkpointer:
    """Saves ``state`` (any pytree of jax arrays) and, optionally, a grain iterator under ``directory/<step>/``."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = storage.path(directory)  # a bucket URI reaches orbax as it is
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any | None = None, force: bool = True) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, data_iter: Any | None = None, step: int | None = None) -> Any:
        """Restores onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs or arrays); the data
        iterator, when given, is restored in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class StopRequest:
    """Set by SIGTERM/SIGINT (preemption, scancel, Ctrl-C) so the loop can save and exit at the next step."""

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
