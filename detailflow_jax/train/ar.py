r"""Train the DetailFlow class-conditional GPT on extracted codes, resuming from the work directory.

    python -m detailflow_jax.train.ar --config configs/ar_fashion_mnist.py --workdir workdir/ar \
        --config.codes_dir=workdir/codes
    python -m detailflow_jax.train.ar --config configs/ar_imagenet.py:N=128 --workdir ... \
        --config.codes_dir=/data/codes/df16 --config.batch_size=512 --config.mesh.fsdp=8

The codes come from ``python -m detailflow_jax.tokenizer.extract``; their metadata.json fixes N, g,
C, the codebook and the classes, which the GPT config must match. Writes to the work directory:
config.json, metrics.jsonl (loss, accuracy, lr, grad_norm, steps/s, images/s), tensorboard/,
checkpoints/<step>/ (state with the EMA weights + data iterator) and, when the tokenizer is
available (config ``tokenizer``, else the one recorded with the codes), images/samples_<step>.png
(one row per class, labelled, EMA weights), images/coarse_to_fine_<step>.png and
images/samples_<step>.gif (the grid refining as tokens arrive). Running the same command again
continues from the latest checkpoint; SIGTERM saves and exits.
"""

from __future__ import annotations

import logging

import jax
import ml_collections

from detailflow_jax import distributed, optim, sharding, storage
from detailflow_jax.config_lib import require
from detailflow_jax.data.codes import CodesMetadata, make_code_iter, read_metadata
from detailflow_jax.data.global_batch import to_global
from detailflow_jax.inference.generator import ImageGenerator, default_classes, sampling_settings
from detailflow_jax.inference.weights import load_tokenizer
from detailflow_jax.train import cli, workdir_lock
from detailflow_jax.train.ar_step import ARProgram, make_ar_step
from detailflow_jax.train.loop import LoopConfig, init_or_restore, run_and_close

log = logging.getLogger(__name__)

# GPT config field -> (metadata field, what it is)
_MATCH_CODES = {
    "num_tokens": ("num_tokens", "N"),
    "group_size": ("group_size", "g"),
    "causal_num": ("causal_num", "C"),
    "vocab_size": ("codebook_size", "the codebook size"),
    "num_classes": ("num_classes", "the number of classes"),
}


def validate(
    config: ml_collections.ConfigDict, meta: CodesMetadata, num_devices: int
) -> tuple[int, int, int]:
    """Checks the config against the devices and the codes; returns the mesh shape."""
    mesh_shape = sharding.resolve_mesh_shape(
        (config.mesh.data, config.mesh.fsdp, config.mesh.tensor), num_devices
    )
    require(config.grad_accum >= 1, "grad_accum", config.grad_accum, "must be >= 1")
    parts = mesh_shape[0] * mesh_shape[1] * config.grad_accum
    require(config.batch_size % parts == 0, "batch_size", config.batch_size,
            f"must be divisible by mesh data x fsdp x grad_accum = {parts}")
    require(config.batch_size % jax.process_count() == 0, "batch_size", config.batch_size,
            f"must be divisible by the number of processes ({jax.process_count()})")
    require(
        0 <= config.correction_prob <= 1,
        "correction_prob",
        config.correction_prob,
        "must be in [0, 1]",
    )
    require(0 <= config.ema_decay < 1, "ema_decay", config.ema_decay, "must be in [0, 1)")
    for field, (meta_field, what) in _MATCH_CODES.items():
        require(
            config.model[field] == getattr(meta, meta_field),
            f"model.{field}",
            config.model[field],
            f"must equal {what} of the codes in {config.codes_dir} ({getattr(meta, meta_field)})",
        )
    return mesh_shape


def sample_hook(
    workdir: str, config, meta: CodesMetadata, program: ARProgram, mesh: jax.sharding.Mesh
):
    """PNG grids of class-conditional samples from the EMA weights, or None when the tokenizer is
    not at hand."""
    path = config.tokenizer or meta.tokenizer["path"]
    if not storage.path(path).is_dir():
        log.warning("tokenizer %s not found: no sample images (set --config.tokenizer)", path)
        return None
    model_cfg = None if config.tokenizer else meta.tokenizer["model"]
    tok_cfg, tok_params = load_tokenizer(
        path, mesh, config.tokenizer_config or None, model_cfg=model_cfg
    )
    generator = ImageGenerator(
        program.model_cfg,
        None,
        program.state_shardings["ema"],
        tok_cfg,
        tok_params,
        mesh,
        sampling_settings(config.sampling),
    )
    classes = default_classes(meta.num_classes, config)
    batch = sharding.round_up(len(classes) * config.samples_per_class, generator.data_parallelism)

    def hook(step: int, state) -> None:
        grids = generator.class_grid(
            classes,
            config.samples_per_class,
            jax.random.key(config.sample_seed),
            batch,
            params=state["ema"],
            class_names=meta.class_names,
        )
        if distributed.is_main_process():
            grids.save(storage.path(workdir) / "images", suffix=f"_{step}")

    return hook


@workdir_lock.holds_workdir
def train(config: ml_collections.ConfigDict, workdir: str, stop_at: int | None = None,
          samples: bool = True) -> dict:
    """Runs (or resumes) training; returns the final state. ``stop_at`` stops after that step with a
    checkpoint, exactly as a preemption would; ``samples=False`` skips the sample images."""
    distributed.maybe_initialize()
    require(
        bool(config.codes_dir),
        "codes_dir",
        config.codes_dir,
        "set it to the output of the extraction command",
    )
    meta = read_metadata(config.codes_dir)
    mesh = sharding.make_mesh(validate(config, meta, jax.device_count()))
    data = make_code_iter(
        config.codes_dir, config.batch_size, config.seed, num_threads=config.data_threads
    )
    schedule = optim.resolve_ar_schedule(config, data.num_examples)
    log.info(
        "schedule (%s code records, global batch %d): %s",
        f"{data.num_examples:,}",
        config.batch_size,
        schedule.describe(),
    )
    program = make_ar_step(config, mesh, schedule)
    checkpointer, state, start = init_or_restore(
        config, workdir, program.init, program.abstract_state, data.iterator
    )
    hook = sample_hook(workdir, config, meta, program, mesh) if samples else None
    loop = LoopConfig(total_steps=schedule.total_steps, log_every=config.log_every,
                      checkpoint_every=config.checkpoint_every, hook_every=config.sample_every,
                      batch_size=config.batch_size, desc="ar", stop_at=stop_at)
    state, _ = run_and_close(
        loop,
        state,
        data,
        lambda s, batch, _: program.step(s, to_global(batch, mesh)),
        start,
        checkpointer,
        workdir,
        hooks=(hook,) if hook else (),
    )
    return state


if __name__ == "__main__":
    cli.run(cli.train_main(__doc__, train, ("model", "codes_dir", "extract", "correction_prob"),
                           "an AR training config (e.g. configs/ar_fashion_mnist.py)"))
