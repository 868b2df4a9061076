"""Mistakes on the command line end with one line `error: ...` (exit status 2), never a traceback,
and leave what is already in the work directory as it was. Each case runs the real command in a
fresh process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tokenizer_fashion_mnist
from detailflow_jax.cli_errors import EXIT_STATUS, VERBOSE_ENV
from detailflow_jax.train import tokenizer as tokenizer_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
SMOKE = os.path.join(CONFIGS, "tokenizer_fashion_mnist.py:smoke")
AR_SMOKE = os.path.join(CONFIGS, "ar_fashion_mnist.py:smoke")
TRAIN_TOKENIZER = "detailflow_jax.train.tokenizer"


def run(module: str, *args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != VERBOSE_ENV}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, no traceback, and the last stderr line is the message (lines before it may
    be a progress bar or logs)."""
    assert proc.returncode == EXIT_STATUS, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last


def tree_hashes(path: str) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), path)] = \
                    hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tokenizer_workdir(tmp_path_factory):
    """A finished 3-step smoke run of the tokenizer trainer."""
    workdir = str(tmp_path_factory.mktemp("tok"))
    config = tokenizer_fashion_mnist.get_config("smoke")
    config.total_steps = 3
    tokenizer_train.train(config, workdir)
    return workdir


@pytest.mark.parametrize("config, message", [
    (os.path.join(CONFIGS, "no_such_file.py"), "no_such_file.py"),
    (os.path.join(CONFIGS, "tokenizer_fashion_mnist.py:nonsense"),
     "unknown config flag 'nonsense'"),
    (AR_SMOKE, "is not a tokenizer training config"),
], ids=["missing_file", "unknown_argument", "ar_config"])
def test_a_config_that_does_not_fit_is_one_line(tmp_path, config, message):
    proc = run(TRAIN_TOKENIZER, "--config", config, "--workdir", str(tmp_path / "w"))
    assert_one_line_error(proc, message)
    assert not os.path.exists(tmp_path / "w")


def test_verbose_adds_the_traceback(tmp_path):
    proc = run(TRAIN_TOKENIZER, "--config", AR_SMOKE, "--workdir", str(tmp_path), "--verbose")
    assert proc.returncode == EXIT_STATUS
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_file_as_workdir_is_one_line_and_left_alone(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    proc = run(TRAIN_TOKENIZER, "--config", SMOKE, "--workdir", str(file))
    assert_one_line_error(proc, "is a file")
    assert file.read_text() == "keep me"


def test_help_shows_config_and_workdir_from_any_directory(tmp_path):
    proc = run(TRAIN_TOKENIZER, "--help", cwd=str(tmp_path))
    assert "--config:" in proc.stdout and "--workdir:" in proc.stdout, proc.stdout


def test_resume_with_another_model_size_is_refused_before_touching_the_workdir(tokenizer_workdir):
    before = tree_hashes(tokenizer_workdir)
    proc = run(TRAIN_TOKENIZER, "--config", SMOKE, "--workdir", tokenizer_workdir,
               "--config.total_steps=3", "--config.model.encoder.width=64")
    assert_one_line_error(proc, "trained with model.encoder.width=32, you asked for 64")
    assert tree_hashes(tokenizer_workdir) == before


@pytest.mark.parametrize("args, message", [
    ((), "is a tokenizer training work directory"),
    (("--num_per_class", "0"), "--num_per_class=0"),
])
def test_sample_refuses_a_tokenizer_workdir_and_zero_samples(tokenizer_workdir, tmp_path, args,
                                                             message):
    before = tree_hashes(tokenizer_workdir)
    proc = run("detailflow_jax.eval.sample", "--gpt", tokenizer_workdir,
               "--out", str(tmp_path / "s"), *args)
    assert_one_line_error(proc, message)
    assert tree_hashes(tokenizer_workdir) == before


def test_a_diverged_run_is_one_line_and_keeps_the_last_checkpoint(tokenizer_workdir):
    """Resumed at step 3 with an absurd learning rate: step 5's losses are NaN, so it is not
    saved (checkpoints come every 3 steps and at the end)."""
    checkpoints = os.path.join(tokenizer_workdir, "checkpoints")
    before = tree_hashes(checkpoints)
    proc = run(TRAIN_TOKENIZER, "--config", SMOKE, "--workdir", tokenizer_workdir,
               "--config.total_steps=5", "--config.optim.lr=1e30")
    assert_one_line_error(proc, "non-finite values at step 5")
    assert "total_steps 3 -> 5" in proc.stderr  # a resume lists its changed settings
    assert tree_hashes(checkpoints) == before


@pytest.mark.parametrize("flag, fragment", [("--topology=v9z:1x1", "--topology='v9z:1x1'"),
                                            ("--recipe=nope", "--recipe='nope'")])
def test_preflight_names_a_bad_topology_or_recipe(flag, fragment):
    proc = run("detailflow_jax.preflight", "--config", AR_SMOKE, flag)
    assert_one_line_error(proc, fragment)


@pytest.mark.parametrize(
    "key, bad, message",
    [
        (
            "norm.weight",
            lambda w: np.where(np.arange(w.size) == 0, np.nan, w).astype(np.float32),
            "norm.weight: 1 NaN/inf values",
        ),
        (
            "tok_embeddings.weight",
            lambda w: w.astype(np.int64),
            "tok_embeddings.weight: int64 values",
        ),
        (
            "layers.0.attention.wqkv.weight",
            lambda w: w[:, :-1],
            "layers.0.attention.wqkv.weight: checkpoint (",
        ),
    ],
    ids=["nan", "int64", "shape"],
)
def test_gpt_converter_names_an_unusable_tensor_by_its_key(tmp_path, key, bad, message):
    import flax.linen as nn
    import jax
    from test_gpt_model import official_state_dict

    from configs import ar_fashion_mnist
    from detailflow_jax.ar.model import GPT, GPTConfig, init_params
    cfg = GPTConfig(**ar_fashion_mnist.get_config("smoke").model).validate()
    state = official_state_dict(nn.unbox(init_params(GPT(cfg), jax.random.key(0))))
    np.savez(tmp_path / "gpt.npz", **{**state, key: bad(state[key])})
    proc = run("detailflow_jax.convert.gpt", "--checkpoint", str(tmp_path / "gpt.npz"),
               "--config", AR_SMOKE, "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, message)
    assert not os.path.exists(tmp_path / "out")


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished 6-step smoke run of the tokenizer trainer: checkpoints at steps 3 and 6."""
    workdir = str(tmp_path_factory.mktemp("tok6"))
    config = tokenizer_fashion_mnist.get_config("smoke")
    tokenizer_train.train(config, workdir)
    return workdir


def _copy(workdir: str, tmp_path) -> str:
    import shutil
    return shutil.copytree(workdir, tmp_path / "w")


def _flip_a_bit(step_dir: str) -> None:
    files = [os.path.join(d, f) for d, _, names in os.walk(step_dir) for f in names
             if not f.startswith("sha256")]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 1
    open(path, "wb").write(bytes(data))


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(two_checkpoints, tmp_path):
    workdir = _copy(two_checkpoints, tmp_path)
    _flip_a_bit(os.path.join(workdir, "checkpoints", "6"))
    proc = run(TRAIN_TOKENIZER, "--config", SMOKE, "--workdir", str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 6" in proc.stderr and "SHA-256" in proc.stderr, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [3, 6, 6]  # steps 4-6 trained again from step 3
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6.damaged"))  # kept, not deleted
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))  # trained again from step 3
    assert not os.path.exists(os.path.join(workdir, ".lock"))  # released at exit


def test_no_intact_checkpoint_is_one_line_and_changes_nothing(two_checkpoints, tmp_path):
    workdir = _copy(two_checkpoints, tmp_path)
    for step in ("3", "6"):
        _flip_a_bit(os.path.join(workdir, "checkpoints", step))
    before = tree_hashes(workdir)
    proc = run(TRAIN_TOKENIZER, "--config", SMOKE, "--workdir", str(workdir))
    assert_one_line_error(proc, "no intact checkpoint", "step 6: ", "step 3: ")
    assert tree_hashes(workdir) == before


def test_a_second_run_in_the_same_workdir_is_refused(two_checkpoints, tmp_path):
    import socket
    workdir = _copy(two_checkpoints, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = os.path.join(workdir, ".lock")
        with open(lock, "w") as f:
            json.dump(
                {"host": socket.gethostname(), "pid": holder.pid, "since": "now", "token": "t"}, f
            )
        before = tree_hashes(workdir)
        proc = run(
            TRAIN_TOKENIZER, "--config", SMOKE, "--workdir", str(workdir), "--config.total_steps=9"
        )
        assert_one_line_error(proc, f"lock {lock}: pid {holder.pid} on {socket.gethostname()}")
        assert tree_hashes(workdir) == before
    finally:
        holder.kill()
        holder.wait()


def test_sigterm_saves_and_releases_the_lock(tmp_path):
    import signal
    import time
    workdir = tmp_path / "w"
    env = {k: v for k, v in os.environ.items() if k != VERBOSE_ENV}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            TRAIN_TOKENIZER,
            "--config",
            SMOKE,
            "--workdir",
            str(workdir),
            "--config.total_steps=100000",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while (
        not (workdir / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None
    ):
        time.sleep(0.5)  # the loop is running once the first metrics are written
    assert (workdir / ".lock").exists()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    # saved on the way out
    assert any(name.isdigit() for name in os.listdir(workdir / "checkpoints"))
    assert not (workdir / ".lock").exists()
