"""Mistakes on the command line end with one line `error: ...` (exit status 2), never a traceback, and leave what
is already in the work directory as it was. Every case runs the real command in a fresh process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from configs import tokenizer_fashion_mnist
from detailflow_jax.cli_errors import EXIT_STATUS
from detailflow_jax.train import tokenizer as tokenizer_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "tokenizer_fashion_mnist.py:smoke")
TRAIN_TOKENIZER = "detailflow_jax.train.tokenizer"


def run(module: str, *args: str, cwd: str = ROOT, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "DETAILFLOW_VERBOSE"}
    env = dict(base, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **env)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2; the last stderr line is the message (earlier lines may be a progress bar), no traceback."""
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
            file = os.path.join(folder, name)
            with open(file, "rb") as f:
                out[os.path.relpath(file, path)] = hashlib.sha256(f.read()).hexdigest()
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
    (os.path.join(ROOT, "configs", "no_such_file.py"), "no_such_file.py"),
    (os.path.join(ROOT, "configs", "tokenizer_fashion_mnist.py:nonsense"), "unknown config flag 'nonsense'"),
    (os.path.join(ROOT, "configs", "ar_fashion_mnist.py:smoke"), "is not a tokenizer training config"),
])
def test_a_config_that_does_not_fit_is_one_line(tmp_path, config, message):
    proc = run(TRAIN_TOKENIZER, "--config", config, "--workdir", str(tmp_path / "w"))
    assert_one_line_error(proc, message)
    assert not os.path.exists(tmp_path / "w")


def test_verbose_adds_the_traceback(tmp_path):
    proc = run(TRAIN_TOKENIZER, "--config", os.path.join(ROOT, "configs", "ar_fashion_mnist.py:smoke"),
               "--workdir", str(tmp_path), "--verbose")
    assert proc.returncode == EXIT_STATUS
    assert "Traceback" in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_file_as_workdir_is_one_line_and_left_alone(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    assert_one_line_error(run(TRAIN_TOKENIZER, "--config", SMOKE, "--workdir", str(file)), "is a file")
    assert file.read_text() == "keep me"


def test_help_shows_config_and_workdir_from_any_directory(tmp_path):
    proc = run(TRAIN_TOKENIZER, "--help", cwd=str(tmp_path))
    assert "--config:" in proc.stdout and "--workdir:" in proc.stdout, proc.stdout


def test_resume_with_another_model_size_is_refused_before_touching_the_workdir(tokenizer_workdir):
    before = tree_hashes(tokenizer_workdir)
    proc = run(TRAIN_TOKENIZER, "--config", SMOKE, "--workdir", tokenizer_workdir, "--config.total_steps=3",
               "--config.model.encoder.width=64")
    assert_one_line_error(proc, "trained with model.encoder.width=32, you asked for 64")
    assert tree_hashes(tokenizer_workdir) == before


@pytest.mark.parametrize("args, message", [
    ((), "is a tokenizer training work directory"),
    (("--num_per_class", "0"), "--num_per_class=0"),
])
def test_sample_refuses_a_tokenizer_workdir_and_zero_samples(tokenizer_workdir, tmp_path, args, message):
    before = tree_hashes(tokenizer_workdir)
    proc = run("detailflow_jax.eval.sample", "--gpt", tokenizer_workdir, "--out", str(tmp_path / "s"), *args)
    assert_one_line_error(proc, message)
    assert tree_hashes(tokenizer_workdir) == before


def test_a_diverged_run_is_one_line_and_keeps_the_last_checkpoint(tokenizer_workdir):
    """Resumed at step 3 with an absurd learning rate: step 5's losses are NaN, so it is not saved."""
    checkpoints = os.path.join(tokenizer_workdir, "checkpoints")
    before = tree_hashes(checkpoints)
    proc = run(TRAIN_TOKENIZER, "--config", SMOKE, "--workdir", tokenizer_workdir, "--config.total_steps=5",
               "--config.optim.lr=1e30")
    assert_one_line_error(proc, "non-finite values at step 5")
    assert "total_steps 3 -> 5" in proc.stderr  # the changed settings of a resume are listed
    assert tree_hashes(checkpoints) == before
