"""The run shared by the tokenizer and AR trainers: init or restore the state, the host loop,
closing.

Per step: next batch -> jitted step. Metrics are fetched one step late so the host never waits on
the step it just dispatched; they are checked for NaN/inf before every checkpoint, so a diverged
state is never saved. SIGTERM or SIGINT (preemption, scancel, Ctrl-C) saves a checkpoint at the next
step boundary and returns.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterator

import jax
from tqdm import tqdm

from detailflow_jax import storage
from detailflow_jax.checkpoint import Checkpointer, StopRequest
from detailflow_jax.distributed import is_main_process
from detailflow_jax.train import run_config
from detailflow_jax.train.metrics import MetricWriter, check_finite

log = logging.getLogger(__name__)

# (state, batch, step) -> (state, device metrics)
StepFn = Callable[[Any, Any, int], tuple[Any, dict]]
Hook = Callable[[int, Any], None]  # (step, state) -> None, e.g. image grids


@dataclasses.dataclass
class LoopConfig:
    total_steps: int
    log_every: int = 50
    checkpoint_every: int = 1000
    hook_every: int = 0  # 0: hooks only at the end
    batch_size: int = 1  # global batch, for images/s
    desc: str = "train"
    stop_at: int | None = None  # stop (with a checkpoint) after this step, as a preemption would


def run_loop(cfg: LoopConfig, state: Any, data_iter: Iterator, step_fn: StepFn, start_step: int,
             checkpointer: Checkpointer, writer: MetricWriter, hooks: tuple[Hook, ...] = (),
             stop: StopRequest | None = None) -> tuple[Any, int]:
    """Runs steps ``start_step .. total_steps``; returns (state, last step reached)."""
    last_saved = checkpointer.latest_step()
    pending: tuple[int, dict] | None = None
    bar = tqdm(
        total=cfg.total_steps,
        initial=start_step,
        desc=cfg.desc,
        disable=not is_main_process(),
        dynamic_ncols=True,
    )
    tick, tick_step = time.perf_counter(), start_step

    def flush(entry):
        step, metrics = entry
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(step, values, last_saved)
        return step, values

    def log(step, values):
        nonlocal tick, tick_step
        now = time.perf_counter()
        rate = (step - tick_step) / max(now - tick, 1e-9)
        tick, tick_step = now, step
        values = {**values, "steps_per_s": rate, "images_per_s": rate * cfg.batch_size}
        writer.write(step, values)
        shown = {
            k: f"{v:.4g}"
            for k, v in values.items()
            if k in ("loss", "rec_loss", "mse", "lpips", "ce", "steps_per_s", "images_per_s")
        }
        bar.set_postfix(shown, refresh=False)

    step = start_step
    try:
        with (stop or StopRequest()) as stop:
            while step < cfg.total_steps:
                state, metrics = step_fn(state, next(data_iter), step)
                step += 1
                bar.update(1)
                if pending is not None:
                    log(*flush(pending))
                    pending = None
                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    pending = (step, metrics)
                if step == cfg.stop_at:
                    stop.request()
                if step % cfg.checkpoint_every == 0 or step == cfg.total_steps or stop.requested:
                    # Check this step's numbers before writing: never save a diverged state.
                    entry = flush((step, metrics))
                    if pending is not None:
                        log(*entry)
                        pending = None
                    checkpointer.save(step, state, data_iter)
                    writer.flush()  # a bucket holds the metrics up to every checkpoint
                    last_saved = step
                if cfg.hook_every and step % cfg.hook_every == 0:
                    for hook in hooks:
                        hook(step, state)
                if stop.requested:
                    if is_main_process():
                        bar.write(f"stop requested: saved step {step} to {checkpointer.directory}")
                    break
    except BaseException:
        writer.flush()
        bar.close()  # so an error message starts on its own line, not after the progress bar
        raise
    if pending is not None:
        log(*flush(pending))
    checkpointer.wait()
    bar.close()
    if step == cfg.total_steps and not (cfg.hook_every and step % cfg.hook_every == 0):
        for hook in hooks:
            hook(step, state)
    return state, step


def init_or_restore(config, workdir: str, init: Callable[[int], Any], abstract_state: Any,
                    data_iter: Iterator) -> tuple[Checkpointer, Any, int]:
    """(checkpointer, state, first step): the latest intact checkpoint of ``workdir`` restored onto
    ``abstract_state`` (the data iterator with it), else ``init(config.seed)``. A resume with other
    model settings is refused before anything is written; the config is saved as the run's
    config.json."""
    run_config.check_resume(config, workdir)
    storage.prepare_dir(workdir)
    checkpointer = Checkpointer(storage.path(workdir) / "checkpoints", keep=config.keep_checkpoints)
    if checkpointer.latest_step() is None:
        state, start = init(config.seed), 0
    else:
        state = checkpointer.restore(abstract_state, data_iter)
        start = checkpointer.restored_step  # older than the latest when that one is damaged
        log.info("resumed from step %d", start)
    if is_main_process():
        run_config.save(config, workdir)
    return checkpointer, state, start


def run_and_close(
    cfg: LoopConfig,
    state: Any,
    data,
    step_fn: StepFn,
    start_step: int,
    checkpointer: Checkpointer,
    workdir: str,
    hooks: tuple[Hook, ...] = (),
) -> tuple[Any, int]:
    """``run_loop`` with the run's metric writer; then closes the data stream (``data.iterator``,
    ``data.close()``), the checkpointer (waiting for its last save) and the writer, also when a step
    fails."""
    writer = MetricWriter(workdir)
    try:
        return run_loop(
            cfg, state, data.iterator, step_fn, start_step, checkpointer, writer, hooks=hooks
        )
    finally:
        data.close()
        checkpointer.close()
        writer.close()
