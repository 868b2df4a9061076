"""Metrics on process 0: one JSON line per logged step, TensorBoard event files, and a non-finite
guard."""

from __future__ import annotations

import json
import math
import time
from typing import Mapping

import jax

from detailflow_jax import storage


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf; the run stops and the last good checkpoint is left as it is."""


def check_finite(step: int, metrics: Mapping[str, float], last_good_step: int | None) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        where = (
            f"the last good checkpoint (step {last_good_step}) is intact"
            if last_good_step is not None
            else "no checkpoint had been written yet"
        )
        raise NonFiniteLossError(
            f"non-finite values at step {step}: {bad}; stopping. {where}. Lower the learning rate "
            "or check the data."
        )


class _BucketEventFile:
    """A TensorBoard event file on a bucket, through epath: kept in memory and written whole at each
    flush (a bucket object cannot be appended to). tensorboardX's own gs:// writer does the same
    through another client, and uploads once more whenever a closed writer is collected, even at
    interpreter exit."""

    def __init__(self, path: str):
        self.path = storage.path(path)
        self._data = bytearray()
        self._written = 0

    def write(self, data: bytes) -> None:
        self._data += data

    def flush(self) -> None:
        if len(self._data) != self._written:
            self.path.write_bytes(bytes(self._data))
            self._written = len(self._data)

    def close(self) -> None:
        self.flush()


class _BucketEventFiles:
    """tensorboardX's writer factory for a URI scheme
    (``record_writer.register_writer_factory``)."""

    def open(self, path: str) -> _BucketEventFile:
        return _BucketEventFile(path)

    def directory_check(self, path: str) -> None:
        storage.path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard_writer(logdir: str):
    from tensorboardX import SummaryWriter, record_writer
    if storage.is_uri(logdir):
        record_writer.register_writer_factory(logdir.split("://", 1)[0], _BucketEventFiles())
    return SummaryWriter(logdir)


class MetricWriter:
    """Appends ``{"step": s, **metrics}`` to ``workdir/metrics.jsonl`` and TensorBoard scalars
    (process 0 only).

    A bucket object cannot be appended to: there the file is rewritten whole, at most every
    ``flush_secs``, at each checkpoint and at ``close``; so are the TensorBoard event files (at
    tensorboardX's flushes)."""

    def __init__(self, workdir: str, tensorboard: bool = True, flush_secs: float = 60.0):
        self.enabled = jax.process_index() == 0
        self.path = storage.path(workdir) / "metrics.jsonl"
        self._rewrite = storage.is_uri(self.path)
        self._flush_secs = flush_secs if self._rewrite else 0.0
        self._written = (
            self.path.read_text() if self.enabled and self._rewrite and self.path.exists() else ""
        )
        self._pending: list[str] = []
        self._flushed_at = time.monotonic()
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self._tb = _tensorboard_writer(str(storage.path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._pending.append(json.dumps(row) + "\n")
        if time.monotonic() - self._flushed_at >= self._flush_secs:
            self.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))

    def flush(self) -> None:
        if not self._pending:
            return
        if self._rewrite:
            self._written += "".join(self._pending)
            self.path.write_text(self._written)
        else:
            with self.path.open("a") as f:
                f.write("".join(self._pending))
        self._pending, self._flushed_at = [], time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.flush()
        if self._tb is not None:
            self._tb.close()
