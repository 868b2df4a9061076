"""Train the DetailFlow tokenizer (coarse-to-fine, with self-correction), resuming from the work directory.

    python -m detailflow_jax.train.tokenizer --config configs/tokenizer_fashion_mnist.py --workdir workdir/tok
    python -m detailflow_jax.train.tokenizer --config configs/tokenizer_imagenet.py:DF-16 --workdir ... \
        --config.batch_size=512 --config.mesh.fsdp=8

Writes to the work directory: config.json, metrics.jsonl, tensorboard/, checkpoints/<step>/ (state + data iterator),
images/step_<k>.png (inputs | reconstructions) and images/coarse_to_fine_<k>.png, and at the end
reconstruction_psnr.json (PSNR on held-out images for every admissible token count). Running the same command again
continues from the latest checkpoint; SIGTERM saves and exits.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from detailflow_jax import distributed, sharding
from detailflow_jax.ar.images import image_grid, preview_strip
from detailflow_jax.config_lib import require
from detailflow_jax.data.global_batch import to_global
from detailflow_jax.data.pipeline import make_eval_iter, make_train_iter
from detailflow_jax.eval.reconstruction import ReconstructionEvaluator
from detailflow_jax.pixels import to_uint8
from detailflow_jax.tokenizer.degradation import degradation_matrix, sample_noise_span, sample_token_count
from detailflow_jax.tokenizer.resolution import ResolutionTables
from detailflow_jax.train import cli, optim, run_config
from detailflow_jax.train.checkpoint import Checkpointer
from detailflow_jax.train.loop import LoopConfig, run_loop
from detailflow_jax.train.metrics import MetricWriter
from detailflow_jax.train.tokenizer_step import TokenizerStep

log = logging.getLogger(__name__)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Checks the training config before anything is allocated; returns the resolved mesh shape."""
    mesh_shape = sharding.resolve_mesh_shape((config.mesh.data, config.mesh.fsdp, config.mesh.tensor), num_devices)
    batch_parts = mesh_shape[0] * mesh_shape[1]
    require(config.batch_size % batch_parts == 0, "batch_size", config.batch_size,
            f"must be divisible by mesh data x fsdp = {batch_parts}")
    require(config.batch_size % jax.process_count() == 0, "batch_size", config.batch_size,
            f"must be divisible by the number of processes ({jax.process_count()})")
    require(0 <= config.degradation_prob <= 1, "degradation_prob", config.degradation_prob, "must be in [0, 1]")
    require(config.data.image_size == config.model.image_size, "data.image_size", config.data.image_size,
            f"must equal model.image_size={config.model.image_size}")
    require(config.rounding in ("ceil", "nearest"), "rounding", config.rounding, "must be 'ceil' or 'nearest'")
    return mesh_shape


class HostDraws:
    """The per-step random choices made on the host: t (the canvas), the noise span. Seeded by (seed, step), so a
    resumed run draws exactly what an uninterrupted one would."""

    def __init__(self, config, tables: ResolutionTables):
        self.config, self.tables = config, tables
        self._matrices: dict[int, jax.Array] = {}

    def __call__(self, step: int):
        cfg, m = self.config, self.config.model
        rng = np.random.default_rng([cfg.seed, step])
        t = sample_token_count(rng, m.num_latent_tokens, m.group_size, m.causal_num, cfg.degradation_prob)
        span = sample_noise_span(rng, t, m.group_size, m.causal_num) if cfg.self_correction else None
        noise_idx, noise_end = span if span is not None else (-1, 0)
        if t not in self._matrices:
            self._matrices[t] = jnp.asarray(degradation_matrix(t, self.tables))
        return t, self.tables.canvas[t], self._matrices[t], np.int32(noise_idx), np.int32(noise_end)


def eval_batches(config, mesh) -> list[jax.Array]:
    """The first ``eval_images`` held-out images as global arrays (fixed across runs)."""
    stream = make_eval_iter(config.data, min(config.batch_size, config.eval_images))
    out, seen = [], 0
    for batch in stream:
        out.append(to_global(batch["image"], mesh))
        seen += out[-1].shape[0]
        if seen >= config.eval_images:
            break
    stream.close()
    return out


def image_hook(workdir: str, evaluator: ReconstructionEvaluator, images: jax.Array, num: int = 8):
    """PNG grids: inputs over full reconstructions, and a coarse-to-fine strip (columns = increasing t)."""
    os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
    images = images[:num]
    tables = evaluator.tables
    counts = tables.token_counts
    shown = sorted({counts[int(i)] for i in np.linspace(0, len(counts) - 1, min(8, len(counts)))})

    def hook(step: int, state) -> None:
        # Every process computes (the arrays span all processes) and gathers; process 0 writes.
        params = state["params"]
        full = evaluator.reconstruct(params, images, tables.num_tokens)
        previews = [evaluator.reconstruct(params, images, t) for t in shown]
        inputs, full, previews = distributed.to_host((images, full, previews))
        if not distributed.is_main_process():
            return
        grid = np.asarray(jnp.concatenate([to_uint8(inputs, "float32"), to_uint8(full)]))  # real, decoded
        image_grid(grid, columns=len(inputs)).save(os.path.join(workdir, "images", f"step_{step}.png"))
        strip = [(t, np.asarray(to_uint8(p))) for t, p in zip(shown, previews)]
        preview_strip(strip).save(os.path.join(workdir, "images", f"coarse_to_fine_{step}.png"))

    return hook


def train(config: ml_collections.ConfigDict, workdir: str, stop_at: int | None = None) -> tuple[dict, dict]:
    """Runs (or resumes) training; returns (final state, PSNR curve {t: dB}; empty when stopped early).

    ``stop_at`` stops after that step with a checkpoint, exactly as a preemption would."""
    distributed.maybe_initialize()
    mesh = sharding.make_mesh(validate(config, jax.device_count()))
    data = make_train_iter(config.data, config.batch_size, config.seed)
    schedule = optim.resolve_tokenizer_schedule(config, data.num_examples)
    log.info("schedule (%s images, global batch %d): %s", f"{data.num_examples:,}", config.batch_size,
             schedule.describe())
    trainer = TokenizerStep(config, mesh, schedule)
    frozen = trainer.load_frozen()  # fails fast when a loss lacks its weights
    tables = ResolutionTables.from_model_config(trainer.model_cfg, rounding=config.rounding)
    run_config.check_resume(config, workdir)
    os.makedirs(workdir, exist_ok=True)

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    start = checkpointer.latest_step()
    if start is None:
        state, state_shardings = trainer.init(config.seed, frozen)
        start = 0
    else:
        abstract = trainer.abstract_state(config.seed, frozen)
        state = checkpointer.restore(abstract, data.iterator)
        state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
        log.info("resumed from step %d", start)
    if distributed.is_main_process():
        run_config.save(config, workdir)

    draws = HostDraws(config, tables)

    def step_fn(state, batch, step):
        t, canvas, matrix, noise_idx, noise_end = draws(step)
        fn = trainer.compiled(canvas, state_shardings, frozen)
        return fn(state, frozen, to_global(batch["image"], mesh), np.int32(t), matrix, noise_idx, noise_end)

    evaluator = ReconstructionEvaluator(trainer.model_cfg, tables)
    held_out = eval_batches(config, mesh)
    loop = LoopConfig(total_steps=schedule.total_steps, log_every=config.log_every,
                      checkpoint_every=config.checkpoint_every, hook_every=config.image_every,
                      batch_size=config.batch_size, desc="tokenizer", stop_at=stop_at)
    writer = MetricWriter(workdir)
    state, step = run_loop(loop, state, data.iterator, step_fn, start, checkpointer, writer,
                           hooks=(image_hook(workdir, evaluator, held_out[0]),))
    data.close()
    checkpointer.close()
    writer.close()
    if step < schedule.total_steps:
        return state, {}
    curve = evaluator.psnr_curve(state["params"], held_out)
    if distributed.is_main_process():
        with open(os.path.join(workdir, "reconstruction_psnr.json"), "w") as f:
            json.dump({"step": step, "images": sum(b.shape[0] for b in held_out),
                       "psnr_db": {str(t): v for t, v in curve.items()}}, f, indent=1)
        print("tokens  canvas  PSNR (dB) on held-out images")
        for t, v in curve.items():
            print(f"{t:6d}  {tables.canvas[t]:6d}  {v:8.2f}")
    return state, curve


if __name__ == "__main__":
    cli.run(cli.train_main(__doc__, train, ("model", "data", "losses", "degradation_prob"),
                           "a tokenizer training config (e.g. configs/tokenizer_fashion_mnist.py)"))
