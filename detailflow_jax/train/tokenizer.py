r"""Train the DetailFlow tokenizer (coarse-to-fine, with self-correction), resuming from the work
directory.

    python -m detailflow_jax.train.tokenizer --config configs/tokenizer_fashion_mnist.py --workdir workdir/tok
    python -m detailflow_jax.train.tokenizer --config configs/tokenizer_imagenet.py:DF-16 --workdir ... \
        --config.batch_size=512 --config.mesh.fsdp=8

Writes to the work directory: config.json, metrics.jsonl, tensorboard/, checkpoints/<step>/ (state +
data iterator), images/step_<k>.png (labelled rows: inputs over reconstructions) and
images/coarse_to_fine_<k>.png (a column per token count t, then the input), and at the end
reconstruction_psnr.json (PSNR on held-out images for every admissible token count). Running the
same command again continues from the latest checkpoint; SIGTERM saves and exits.
"""  # noqa: E501

from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np

from detailflow_jax import distributed, optim, sharding, storage
from detailflow_jax.config_lib import require
from detailflow_jax.data.global_batch import to_global
from detailflow_jax.data.pipeline import make_eval_iter, make_train_iter
from detailflow_jax.inference import pictures
from detailflow_jax.inference.reconstruction import ReconstructionEvaluator
from detailflow_jax.pixels import to_uint8
from detailflow_jax.tokenizer.degradation import (
    degradation_matrix,
    sample_noise_span,
    sample_token_count,
)
from detailflow_jax.tokenizer.resolution import ResolutionTables
from detailflow_jax.train import cli, workdir_lock
from detailflow_jax.train.loop import LoopConfig, init_or_restore, run_and_close
from detailflow_jax.train.tokenizer_step import (
    FrozenNets,
    compile_canvases,
    load_frozen,
    make_tokenizer_step,
)

log = logging.getLogger(__name__)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Checks the training config before anything is allocated; returns the resolved mesh shape."""
    mesh_shape = sharding.resolve_mesh_shape(
        (config.mesh.data, config.mesh.fsdp, config.mesh.tensor), num_devices
    )
    batch_parts = mesh_shape[0] * mesh_shape[1]
    require(config.batch_size % batch_parts == 0, "batch_size", config.batch_size,
            f"must be divisible by mesh data x fsdp = {batch_parts}")
    require(config.batch_size % jax.process_count() == 0, "batch_size", config.batch_size,
            f"must be divisible by the number of processes ({jax.process_count()})")
    require(
        0 <= config.degradation_prob <= 1,
        "degradation_prob",
        config.degradation_prob,
        "must be in [0, 1]",
    )
    require(
        config.data.image_size == config.model.image_size,
        "data.image_size",
        config.data.image_size,
        f"must equal model.image_size={config.model.image_size}",
    )
    require(
        config.rounding in ("ceil", "nearest"),
        "rounding",
        config.rounding,
        "must be 'ceil' or 'nearest'",
    )
    return mesh_shape


class HostDraws:
    """The per-step random choices made on the host: t (the canvas), the noise span. Seeded by
    (seed, step), so a resumed run draws exactly what an uninterrupted one would."""

    def __init__(
        self, config, tables: ResolutionTables, placement: jax.sharding.Sharding | None = None
    ):
        self.config, self.tables, self.placement = config, tables, placement
        self._matrices: dict[int, jax.Array] = {}

    def _token_count(self, rng: np.random.Generator) -> int:
        m = self.config.model
        return sample_token_count(
            rng, m.num_latent_tokens, m.group_size, m.causal_num, self.config.degradation_prob
        )

    def token_count(self, step: int) -> int:
        """The t that step ``step`` draws."""
        return self._token_count(np.random.default_rng([self.config.seed, step]))

    def __call__(self, step: int):
        cfg, m = self.config, self.config.model
        rng = np.random.default_rng([cfg.seed, step])
        t = self._token_count(rng)
        span = (
            sample_noise_span(rng, t, m.group_size, m.causal_num) if cfg.self_correction else None
        )
        noise_idx, noise_end = span if span is not None else (-1, 0)
        if t not in self._matrices:
            self._matrices[t] = jax.device_put(degradation_matrix(t, self.tables), self.placement)
        return t, self.tables.canvas[t], self._matrices[t], np.int32(noise_idx), np.int32(noise_end)


def canvases_drawn(draws: HostDraws, steps: range) -> list[int]:
    """The canvases that ``steps`` draw, largest (the most frequent) first; stops looking once all
    are found."""
    found, every = set(), set(draws.tables.canvas_sizes)
    for step in steps:
        found.add(draws.tables.canvas[draws.token_count(step)])
        if found == every:
            break
    return sorted(found, reverse=True)


def make_step_fn(steps: dict, draws: HostDraws, frozen: FrozenNets, mesh: jax.sharding.Mesh):
    """(state, host batch, step) -> (state, device metrics): the step's host draws, then the step of
    its canvas (``steps``: canvas -> jitted or compiled step) on the batch placed over the mesh."""

    def step_fn(state, batch, step):
        t, canvas, matrix, noise_idx, noise_end = draws(step)
        return steps[canvas](
            state,
            frozen.params,
            to_global(batch["image"], mesh),
            np.int32(t),
            matrix,
            noise_idx,
            noise_end,
        )

    return step_fn


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
    """Labelled PNGs: inputs over full reconstructions, and a coarse-to-fine strip (a column per
    token count t, then the input)."""
    images = images[:num]
    tables = evaluator.tables
    shown = pictures.spread(tables.token_counts, pictures.MAX_STRIP_COLUMNS)
    directory = storage.path(workdir) / "images"

    def hook(step: int, state) -> None:
        # Every process computes (the arrays span all processes) and gathers; process 0 writes.
        params = state["params"]
        full = evaluator.reconstruct(params, images, tables.num_tokens)
        previews = [evaluator.reconstruct(params, images, t) for t in shown]
        inputs, full, previews = distributed.to_host((images, full, previews))
        if not distributed.is_main_process():
            return
        inputs = np.asarray(to_uint8(inputs, "float32"))  # real images: float32 arithmetic
        grid = pictures.reconstruction_grid(inputs, np.asarray(to_uint8(full)),
                                            title=f"step {step}: all {tables.num_tokens} tokens")
        pictures.save_png(grid, directory / f"step_{step}.png")
        columns = [
            (pictures.token_label(t), np.asarray(to_uint8(p))) for t, p in zip(shown, previews)
        ]
        strip = pictures.strip(columns + [("input", inputs)], title=f"step {step}")
        pictures.save_png(strip, directory / f"coarse_to_fine_{step}.png")

    return hook


@workdir_lock.holds_workdir
def train(
    config: ml_collections.ConfigDict, workdir: str, stop_at: int | None = None
) -> tuple[dict, dict]:
    """Runs (or resumes) training; returns (final state, PSNR curve {t: dB}; empty when stopped
    early).

    ``stop_at`` stops after that step with a checkpoint, exactly as a preemption would."""
    distributed.maybe_initialize()
    mesh = sharding.make_mesh(validate(config, jax.device_count()))
    data = make_train_iter(config.data, config.batch_size, config.seed)
    schedule = optim.resolve_tokenizer_schedule(config, data.num_examples)
    log.info(
        "schedule (%s images, global batch %d): %s",
        f"{data.num_examples:,}",
        config.batch_size,
        schedule.describe(),
    )
    frozen = load_frozen(config)  # fails fast when a loss lacks its weights
    program = make_tokenizer_step(config, mesh, frozen, schedule)
    checkpointer, state, start = init_or_restore(
        config, workdir, program.init, program.abstract_state, data.iterator
    )
    tables = program.tables
    draws = HostDraws(config, tables, sharding.replicated(mesh))
    executables = compile_canvases(
        program,
        canvases_drawn(draws, range(start, schedule.total_steps)),
        workers=config.compile_workers,
    )
    step_fn = make_step_fn(executables, draws, frozen, mesh)
    evaluator = ReconstructionEvaluator(program.model_cfg, tables)
    held_out = eval_batches(config, mesh)
    loop = LoopConfig(total_steps=schedule.total_steps, log_every=config.log_every,
                      checkpoint_every=config.checkpoint_every, hook_every=config.image_every,
                      batch_size=config.batch_size, desc="tokenizer", stop_at=stop_at)
    state, step = run_and_close(loop, state, data, step_fn, start, checkpointer, workdir,
                                hooks=(image_hook(workdir, evaluator, held_out[0]),))
    if step < schedule.total_steps:
        return state, {}
    curve = evaluator.psnr_curve(state["params"], held_out)
    if distributed.is_main_process():
        storage.write_json(storage.path(workdir) / "reconstruction_psnr.json",
                           {"step": step, "images": sum(b.shape[0] for b in held_out),
                            "psnr_db": {str(t): v for t, v in curve.items()}})
        print("tokens  canvas  PSNR (dB) on held-out images")
        for t, v in curve.items():
            print(f"{t:6d}  {tables.canvas[t]:6d}  {v:8.2f}")
    return state, curve


if __name__ == "__main__":
    cli.run(cli.train_main(__doc__, train, ("model", "data", "losses", "degradation_prob"),
                           "a tokenizer training config (e.g. configs/tokenizer_fashion_mnist.py)"))
