"""One process of the multi-process training check (started by tests/test_multiprocess.py through launch/local.sh).

    launch/local.sh --processes 2 --fake-devices 4 -- tests.multiprocess_worker --out DIR   # the checked run
    launch/local.sh --fake-devices 8 -- tests.multiprocess_worker --out DIR                 # the reference run

Both runs use a global (data, fsdp, tensor) = (2, 2, 2) mesh of 8 CPU devices and do the same work:
  tokenizer   the real trainer (``detailflow_jax.train.tokenizer.train``): 2 steps and a checkpoint, then a second
              call that restores (state and data iterator) and runs 2 more steps;
  gpt         ``make_ar_step``: 2 steps on synthetic codes, a checkpoint written by all processes, a restore onto fresh
              shardings, 2 more steps;
  data        one epoch of this process's slice of the training data (the ``index`` of every image).
Written to --out by process 0 (metrics.jsonl stays in the tokenizer work directory): ``gpt_losses.json``,
``<part>_start.npz`` and ``<part>_params.npz`` (full parameters before and after, gathered from all processes);
every process writes ``indices_<p>.json``. Both parts train with plain SGD, so the runs can be compared update for
update with a tolerance from float32 summation order.
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from configs import ar_fashion_mnist, tokenizer_fashion_mnist
from detailflow_jax import distributed, optim, sharding
from detailflow_jax.checkpoint import Checkpointer
from detailflow_jax.data.global_batch import to_global
from detailflow_jax.data.pipeline import make_train_iter
from detailflow_jax.train import tokenizer as tokenizer_train
from detailflow_jax.train.ar_step import make_ar_step
from detailflow_jax.train.tokenizer_step import FrozenNets, make_tokenizer_step
from tests.float_tolerance import plain_sgd

MESH = (2, 2, 2)
FIRST_STEPS, MORE_STEPS = 2, 2


def tokenizer_config():
    """The smoke tokenizer with one decoder canvas (one compile) and no per-sample random draws, so
    the result does not depend on how the processes' slices are ordered inside the global batch."""
    config = tokenizer_fashion_mnist.get_config("smoke")
    config.mesh.update(data=MESH[0], fsdp=MESH[1], tensor=MESH[2])
    config.degradation_prob = 0.0
    config.self_correction = False
    # never reached: the end-of-training PSNR curve (a compile per canvas) is left out
    config.total_steps = 100
    config.log_every = 1
    config.checkpoint_every = config.image_every = 1000
    config.eval_images = 8
    config.data.update(num_threads=1, prefetch=4)
    return config


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(distributed.to_host(tree))}


def save_npz(path: str, tree) -> None:
    arrays = flat(tree)  # a collective: every process takes part, process 0 writes
    if distributed.is_main_process():
        np.savez(path, **arrays)


def run_tokenizer(out: str) -> None:
    config, workdir = tokenizer_config(), os.path.join(out, "tokenizer")
    # what train() starts from
    start = make_tokenizer_step(config, sharding.make_mesh(MESH), FrozenNets({})).init(config.seed)
    save_npz(os.path.join(out, "tokenizer_start.npz"), start["params"])
    tokenizer_train.train(config, workdir, stop_at=FIRST_STEPS)
    state, _ = tokenizer_train.train(config, workdir, stop_at=FIRST_STEPS + MORE_STEPS)
    save_npz(os.path.join(out, "tokenizer_params.npz"), state["params"])


def gpt_batch(config, step: int) -> dict[str, np.ndarray]:
    """The global batch of ``step``: the same on every run, whatever the number of processes."""
    m = config.model
    rng = np.random.default_rng([config.seed, step])
    return {
        "codes": rng.integers(
            0, m.vocab_size, (config.batch_size, m.num_tokens, 3), dtype=np.int32
        ),
        "label": rng.integers(0, m.num_classes, (config.batch_size,), dtype=np.int32),
    }


def local_rows(batch: dict[str, np.ndarray], mesh) -> dict[str, np.ndarray]:
    """This process's rows of a global batch, as its data pipeline would yield them."""
    size = len(batch["label"])
    index_map = sharding.batch_sharding(mesh, 1).addressable_devices_indices_map((size,))
    # (start, stop) of each shard
    spans = sorted({idx[0].indices(size)[:2] for idx in index_map.values()})
    take = np.concatenate([np.arange(start, stop) for start, stop in spans])
    return {k: v[take] for k, v in batch.items()}


def run_gpt(out: str) -> None:
    config = ar_fashion_mnist.get_config("smoke")
    mesh = sharding.make_mesh(MESH)
    program = make_ar_step(config, mesh)
    state = program.init(config.seed)
    save_npz(os.path.join(out, "gpt_start.npz"), state["params"])
    step_fn = program.step
    losses = []

    def run(state, steps):
        for step in steps:
            state, metrics = step_fn(
                state, to_global(local_rows(gpt_batch(config, step), mesh), mesh)
            )
            losses.append(float(metrics["loss"]))
        return state

    state = run(state, range(FIRST_STEPS))
    checkpointer = Checkpointer(os.path.join(out, "gpt_checkpoints"))
    checkpointer.save(FIRST_STEPS, state)
    checkpointer.wait()
    del state
    state = checkpointer.restore(program.abstract_state)
    checkpointer.close()
    state = run(state, range(FIRST_STEPS, FIRST_STEPS + MORE_STEPS))
    save_npz(os.path.join(out, "gpt_params.npz"), state["params"])
    if distributed.is_main_process():
        with open(os.path.join(out, "gpt_losses.json"), "w") as f:
            json.dump(losses, f)


def record_data_slice(out: str) -> None:
    """The source index of every image this process reads in one epoch."""
    config = tokenizer_config()
    epoch_steps = config.data.synthetic_examples // config.batch_size
    stream = make_train_iter(config.data, config.batch_size, config.seed)
    indices = [int(i) for _ in range(epoch_steps) for i in next(stream)["index"]]
    stream.close()
    with open(os.path.join(out, f"indices_{jax.process_index()}.json"), "w") as f:
        json.dump(indices, f)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output directory (shared by all processes)")
    parser.add_argument(
        "--parts", default="data,tokenizer,gpt", help="comma list of: data, tokenizer, gpt"
    )
    args = parser.parse_args()
    # from DETAILFLOW_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID (local.sh)
    distributed.maybe_initialize()
    # Plain SGD instead of Adam: the runs are compared update for update (tests/float_tolerance.py
    # says why).
    optim.adam = optim.adamw = plain_sgd()
    # CPU time is this test's budget. The models are tiny, so XLA's optimisations cost more than
    # they save (as in tests/conftest.py); the resumed tokenizer run builds a new trainer, and the
    # disk cache turns its second compile into a load.
    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    os.makedirs(args.out, exist_ok=True)
    parts = {"data": record_data_slice, "tokenizer": run_tokenizer, "gpt": run_gpt}
    for name in args.parts.split(","):
        parts[name](args.out)
    print(f"process {jax.process_index()} of {jax.process_count()}: done", flush=True)


if __name__ == "__main__":
    main()
