"""Multi-host runs on one machine, and the checks that guard them.

Two JAX processes on 127.0.0.1 (4 simulated CPU devices each, one global (2, 2, 2) mesh of 8),
started by launch/local.sh, train the tokenizer (the real trainer, with a checkpoint and a resume)
and the GPT (save, restore, continue), and must end with the same losses and parameters as one
process with 8 devices; the checkpoint they wrote together restores onto another mesh in this
process; their data slices are disjoint and cover the epoch. Without processes: mesh configs are
validated against the device count and every sharded dimension before allocation, and start-up reads
its settings from flags and the environment.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from configs.common import MESH_RECIPES, mesh_config, mesh_for
from detailflow_jax import distributed, optim, sharding
from detailflow_jax.checkpoint import Checkpointer
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.sharding import MeshError
from detailflow_jax.train import tokenizer as tokenizer_train
from detailflow_jax.train.tokenizer_step import FrozenNets, make_tokenizer_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import multiprocess_worker as worker  # noqa: E402
from float_tolerance import assert_same_updates, plain_sgd, reorder_tolerance  # noqa: E402

TIMEOUT_S = 900


def _launch(out: pathlib.Path, *local_args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "DETAILFLOW_", "JAX_"))}
    env["PYTHON"] = sys.executable
    command = [
        "bash",
        "launch/local.sh",
        *local_args,
        "--",
        "tests.multiprocess_worker",
        "--out",
        str(out),
    ]
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # local.sh and every process it started
    except ProcessLookupError:
        pass
    proc.wait()


def _run_both(base: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(one process x 8 devices, two processes x 4 devices) output directories; both runs go at
    once."""
    one, two = base / "one", base / "two"
    procs = {
        one: _launch(one, "--fake-devices", "8"),
        two: _launch(two, "--processes", "2", "--fake-devices", "4"),
    }
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs.values()]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.5)
        for out, proc in procs.items():
            if proc.poll() != 0:
                log = out.with_suffix(".log").read_text()[-6000:]
                pytest.fail(
                    f"{out.name} run failed (exit {proc.returncode}; None: over {TIMEOUT_S} "
                    f"s):\n{log}"
                )
    finally:
        for proc in procs.values():
            _stop(proc)
    return one, two


def _losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _assert_same_updates(
    out_a: pathlib.Path, out_b: pathlib.Path, part: str, num_terms: int
) -> None:
    with (
        np.load(out_a / f"{part}_start.npz") as start,
        np.load(out_b / f"{part}_start.npz") as start_b,
        np.load(out_a / f"{part}_params.npz") as a,
        np.load(out_b / f"{part}_params.npz") as b,
    ):
        assert sorted(a.files) == sorted(b.files) == sorted(start.files)
        for key in start.files:
            np.testing.assert_array_equal(start[key], start_b[key], err_msg=key)
        assert_same_updates(dict(start), dict(a), dict(b), num_terms)


def _check_training_matches(one: pathlib.Path, two: pathlib.Path) -> None:
    steps = list(range(1, worker.FIRST_STEPS + worker.MORE_STEPS + 1))
    # metrics.jsonl is written by process 0 only: each step once, across the stop and the resume.
    tok_one, tok_two = _losses(one / "tokenizer"), _losses(two / "tokenizer")
    assert [s for s, _ in tok_two] == steps and [s for s, _ in tok_one] == steps
    # Every gradient element sums over the batch's pixels (tokenizer) or its logits (GPT):
    # tests/float_tolerance.py.
    tok_config = worker.tokenizer_config()
    tok_terms = tok_config.batch_size * tok_config.model.image_size ** 2 * 3
    np.testing.assert_allclose([v for _, v in tok_two], [v for _, v in tok_one],
                               rtol=reorder_tolerance(tok_terms, 1.0))
    _assert_same_updates(one, two, "tokenizer", tok_terms)

    gpt_config = worker.ar_fashion_mnist.get_config("smoke")
    gpt_terms = gpt_config.batch_size * gpt_config.model.num_tokens * gpt_config.model.vocab_size
    gpt_one, gpt_two = (json.loads((d / "gpt_losses.json").read_text()) for d in (one, two))
    assert len(gpt_two) == len(steps)
    np.testing.assert_allclose(gpt_two, gpt_one, rtol=reorder_tolerance(gpt_terms, 1.0))
    _assert_same_updates(one, two, "gpt", gpt_terms)


def _check_restore_onto_another_mesh(two: pathlib.Path) -> None:
    config = worker.tokenizer_config()
    # the workers' optimiser, so the optimiser states have one structure
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optim, "adam", plain_sgd())
        # written on (2, 2, 2) by two processes
        program = make_tokenizer_step(config, sharding.make_mesh((1, 4, 2)), FrozenNets({}))
    checkpointer = Checkpointer(str(two / "tokenizer" / "checkpoints"))
    state = checkpointer.restore(program.abstract_state)
    checkpointer.close()
    assert int(state["step"]) == worker.FIRST_STEPS + worker.MORE_STEPS
    assert {tuple(x.sharding.mesh.devices.shape) for x in jax.tree.leaves(state)} == {(1, 4, 2)}
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state["params"]))
    with np.load(two / "tokenizer_params.npz") as saved:
        restored = worker.flat(state["params"])
        assert sorted(restored) == sorted(saved.files)
        for key, value in restored.items():
            np.testing.assert_array_equal(value, saved[key], err_msg=key)


def _check_data_slices(one: pathlib.Path, two: pathlib.Path) -> None:
    """The processes' slices of an epoch are disjoint and together cover it."""
    parts = [json.loads((two / f"indices_{p}.json").read_text()) for p in range(2)]
    epoch = worker.tokenizer_config().data.synthetic_examples
    assert len(parts[0]) == len(parts[1]) == epoch // 2
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(epoch))
    assert sorted(json.loads((one / "indices_0.json").read_text())) == list(range(epoch))


@pytest.mark.multiprocess
def test_two_processes_on_localhost(tmp_path):
    # One test, not three sharing a fixture: pytest-xdist would run a shared fixture once per
    # worker.
    one, two = _run_both(tmp_path)
    _check_training_matches(one, two)
    _check_restore_onto_another_mesh(two)
    _check_data_slices(one, two)


# ---------------------------------------------------------------------------------- mesh validation

# Devices of each named slice, as JAX counts them (TPU v4/v5p names count TensorCores, 2 per chip).
SLICE_DEVICES = {
    "1xgpu": 1,
    "8xH100": 8,
    "2x8xH100": 16,
    "v4-8": 4,
    "v4-128": 64,
    "v5e-8": 8,
    "v5e-256": 256,
    "v5p-128": 64,
}


def test_mesh_recipes_fit_their_slices():
    assert set(SLICE_DEVICES) == set(MESH_RECIPES) - {"cpu"}
    for name, devices in SLICE_DEVICES.items():
        assert np.prod(sharding.resolve_mesh_shape(mesh_for(name), devices)) == devices
        with pytest.raises(MeshError, match=f"{devices * 2} are available"):
            sharding.resolve_mesh_shape(mesh_for(name), devices * 2)


def test_recipe_mesh_of_another_slice_is_refused_before_allocation(tmp_path):
    config = worker.tokenizer_config()
    config.total_steps = 1
    config.mesh = mesh_config("v5e-256")
    with pytest.raises(MeshError, match=r"uses 256 devices but 8 are available"):
        tokenizer_train.train(config, str(tmp_path))
    with pytest.raises(KeyError, match="unknown mesh recipe 'v5e-255'"):
        mesh_config("v5e-255")


def test_indivisible_parameter_dimension_is_named_before_allocation(tmp_path):
    config = worker.tokenizer_config()
    config.total_steps = 1
    config.model.encoder.width = 36  # the encoder's "embed" dimension, split over fsdp
    config.mesh = mesh_config((1, 8, 1))
    before = len(jax.live_arrays())
    with pytest.raises(
        MeshError,
        match=r"\['encoder'\].*: dimension \d has size 36, which mesh axes \('fsdp',\) "
        r"\(8 devices\) do not divide",
    ):
        tokenizer_train.train(config, str(tmp_path))
    assert len(jax.live_arrays()) <= before


def test_indivisible_batch_is_named(tmp_path):
    config = worker.tokenizer_config()
    config.total_steps = 1
    config.mesh = mesh_config((-1, 1, 1))
    config.batch_size = 12
    with pytest.raises(ConfigError, match=r"batch_size=12.*mesh data x fsdp = 8"):
        tokenizer_train.train(config, str(tmp_path))


# -------------------------------------------------------------------------------- start-up settings

@pytest.fixture
def fake_initialize(monkeypatch):
    """Records jax.distributed.initialize calls instead of starting a distributed runtime."""
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs))
    )
    for name in list(os.environ):
        if name.startswith(("SLURM_", "TPU_", "DETAILFLOW_")) or name == "CUDA_VISIBLE_DEVICES":
            monkeypatch.delenv(name)
    return calls


def test_single_process_needs_nothing(fake_initialize, monkeypatch):
    assert distributed.maybe_initialize() is False and fake_initialize == []
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job is a one-process run
    assert distributed.maybe_initialize() is False and fake_initialize == []


def test_explicit_settings_from_the_environment(fake_initialize, monkeypatch):
    monkeypatch.setenv("DETAILFLOW_COORDINATOR", "10.0.0.1:1234")
    with pytest.raises(ValueError, match=r"missing \['number of processes', 'process id'\]"):
        distributed.maybe_initialize()
    monkeypatch.setenv("DETAILFLOW_NUM_PROCESSES", "4")
    monkeypatch.setenv("DETAILFLOW_PROCESS_ID", "4")
    with pytest.raises(
        ValueError, match=r"process id 4 must lie in \[0, number of processes = 4\)"
    ):
        distributed.maybe_initialize()
    monkeypatch.setenv("DETAILFLOW_PROCESS_ID", "3")
    monkeypatch.setenv("DETAILFLOW_LOCAL_DEVICE_IDS", "4,5,6,7")
    assert distributed.maybe_initialize()
    assert fake_initialize == [(("10.0.0.1:1234", 4, 3, [4, 5, 6, 7]), {})]
    # arguments win
    assert distributed.maybe_initialize(process_id=0) and fake_initialize[-1][0][2] == 0


def test_explicit_settings_from_command_line_flags(fake_initialize, monkeypatch):
    monkeypatch.setenv("DETAILFLOW_PROCESS_ID", "0")  # a flag beats the environment
    flags.FLAGS.mark_as_parsed()
    try:
        with flagsaver.flagsaver(
            coordinator_address="h:1", num_processes=2, process_id=1, local_device_ids=["2"]
        ):
            assert distributed.maybe_initialize()
    finally:
        flags.FLAGS.unparse_flags()
    assert fake_initialize == [(("h:1", 2, 1, [2]), {})]


def test_slurm_with_one_task_per_node_gets_all_local_gpus(fake_initialize, monkeypatch):
    for key, value in dict(
        SLURM_JOB_ID="9",
        SLURM_NTASKS="2",
        SLURM_NNODES="2",
        SLURM_STEP_NUM_NODES="2",
        CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7",
    ).items():
        monkeypatch.setenv(key, value)
    assert distributed.maybe_initialize()
    assert fake_initialize == [((), {"local_device_ids": list(range(8))})]
    # one task per GPU: JAX's own choice (SLURM_LOCALID) stands
    monkeypatch.setenv("SLURM_NTASKS", "16")
    distributed.maybe_initialize()
    assert fake_initialize[-1] == ((), {"local_device_ids": None})
    monkeypatch.setenv("DETAILFLOW_DISTRIBUTED", "0")
    assert distributed.maybe_initialize() is False and len(fake_initialize) == 2


def test_tpu_vm_switch_uses_auto_detection(fake_initialize, monkeypatch):
    monkeypatch.setenv("DETAILFLOW_DISTRIBUTED", "1")
    assert distributed.maybe_initialize()
    assert fake_initialize == [((), {"local_device_ids": None})]
