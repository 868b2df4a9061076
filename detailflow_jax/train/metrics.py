"""Metrics on process 0: one JSON line per logged step, TensorBoard event files, and a non-finite guard."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import jax


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf; the run stops and the last good checkpoint is left as it is."""


def check_finite(step: int, metrics: Mapping[str, float], last_good_step: int | None) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        where = f"the last good checkpoint (step {last_good_step}) is intact" if last_good_step is not None \
            else "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"non-finite values at step {step}: {bad}; stopping. {where}. Lower the learning rate or check the data.")


class MetricWriter:
    """Appends ``{"step": s, **metrics}`` to ``workdir/metrics.jsonl`` and TensorBoard scalars (process 0 only)."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
