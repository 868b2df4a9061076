"""Work directories on a bucket, against a local Google Cloud Storage server (gcp-storage-emulator,
see tests/gcs_emulator.py): the main job (tokenizer, codes extracted into the bucket, the GPT
trained from them, samples from the bucket's GPT, the quality check) writes every artefact into the
bucket and nothing into a local ``gs:`` folder; a run stopped as a preemption stops resumes from the
bucket's checkpoint exactly; evaluation samples, image-folder datasets and converter inputs and
outputs live on the bucket; a missing bucket or a bucket without write access is one clear line.
Select them with ``-m gcs``."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from detailflow_jax import storage
from detailflow_jax.data import codes as codes_lib

pytest.importorskip(
    "gcp_storage_emulator", reason="pip install -e '.[dev]' installs the storage emulator"
)
# not imported here: the fixture sets its environment first
if importlib.util.find_spec("gcsfs") is None:
    pytest.skip("pip install -e '.[gcs]' installs the gs:// client", allow_module_level=True)

import gcs_emulator  # noqa: E402

pytestmark = pytest.mark.gcs
BUCKET = "detailflow-test"


@pytest.fixture(scope="session")
def bucket():
    """gs://BUCKET on a local emulator; this process and its subprocesses talk to it (the
    environment)."""
    with gcs_emulator.emulator(BUCKET) as url, pytest.MonkeyPatch.context() as mp:
        for key, value in gcs_emulator.client_env(url).items():
            mp.setenv(key, value)
        yield f"gs://{BUCKET}"


def names(directory) -> set[str]:
    return {p.name for p in storage.path(directory).iterdir()}


def test_main_job_on_a_bucket_writes_everything_there(bucket, tmp_path, monkeypatch, capsys):
    from detailflow_jax import quickstart
    monkeypatch.chdir(tmp_path)  # a local "gs:" folder would appear here
    work = f"{bucket}/main_job"
    quickstart.run_main_job(work, smoke=True, quality_samples=20)
    assert not (tmp_path / "gs:").exists() and list(tmp_path.iterdir()) == []
    assert {
        "tokenizer",
        "codes",
        "gpt",
        "samples",
        "quality.json",
        "timings.json",
        ".done",
    } <= names(work)
    assert names(f"{work}/.done") == {"tokenizer", "codes", "gpt", "samples", "quality"}
    for run in ("tokenizer", "gpt"):
        assert {"config.json", "metrics.jsonl", "checkpoints", "images", "tensorboard"} <= names(
            f"{work}/{run}"
        )
        events = [
            p for p in storage.path(f"{work}/{run}/tensorboard").iterdir() if "tfevents" in p.name
        ]
        # the scalars reached the bucket
        assert len(events) == 1 and b"steps_per_s" in events[0].read_bytes()
        rows = storage.path(f"{work}/{run}/metrics.jsonl").read_text().splitlines()
        steps = [json.loads(row)["step"] for row in rows]
        assert steps and steps == sorted(steps)
        assert any(n.isdigit() for n in names(f"{work}/{run}/checkpoints"))
    assert {"step_3.png", "coarse_to_fine_6.png"} <= names(f"{work}/tokenizer/images")
    assert "psnr_db" in storage.read_json(f"{work}/tokenizer/reconstruction_psnr.json")
    meta, chunks = codes_lib.open_codes(f"{work}/codes")  # every chunk is there, nothing else
    assert chunks[0].startswith(f"{work}/codes/") and meta.num_images > 0
    assert {"samples.png", "coarse_to_fine.png"} <= names(f"{work}/samples")
    assert "GPT samples" in storage.read_json(f"{work}/quality.json")["rows"]
    # A rerun finds the finished stages in the bucket.
    capsys.readouterr()
    quickstart.run_main_job(work, smoke=True, quality_samples=20)
    assert capsys.readouterr().out.count("done already") == 5


def test_run_stopped_on_a_bucket_resumes_from_its_checkpoint_exactly(bucket, tmp_path):
    from test_tokenizer_training import tiny_config

    from detailflow_jax.train import tokenizer as tokenizer_train
    config = tiny_config(total_steps=6, checkpoint_every=100, log_every=1)
    uninterrupted, _ = tokenizer_train.train(config, str(tmp_path / "local"))
    work = f"{bucket}/resume"
    # as SIGTERM does: checkpoint, then exit
    stopped, _ = tokenizer_train.train(config, work, stop_at=3)
    assert int(stopped["step"]) == 3 and names(f"{work}/checkpoints") == {"3"}
    resumed, _ = tokenizer_train.train(config, work)
    assert int(resumed["step"]) == 6
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(uninterrupted),
                 jax.device_get(resumed))
    # metrics.jsonl cannot be appended to on a bucket: the resumed run kept the first run's rows.
    rows = storage.path(f"{work}/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_evaluation_samples_on_a_bucket_resume_and_equal_a_local_run(bucket, tmp_path):
    from test_evaluate import FakeGenerator

    from detailflow_jax.eval import evaluate
    settings = {**dict.fromkeys(evaluate.GENERATION_KEYS), "num_samples": 10, "num_classes": 5,
                "label_mode": "random", "seed": 7, "batch_size": 2, "chunk_size": 4}
    quiet = dict(log=lambda message: None)
    evaluate.run_evaluation(FakeGenerator(), None, settings, str(tmp_path), **quiet)
    work = f"{bucket}/eval"
    assert (
        evaluate.run_evaluation(FakeGenerator(), None, settings, work, stop_after_chunks=1, **quiet)
        is None
    )
    assert names(f"{work}/chunks") == {"chunk_00000.npz"}
    results = evaluate.run_evaluation(FakeGenerator(), None, settings, work, **quiet)
    assert results["samples_npz"] == f"{work}/samples_10.npz"
    remote, local = (
        storage.load_npz(results["samples_npz"]),
        storage.load_npz(tmp_path / "samples_10.npz"),
    )
    assert remote.keys() == local.keys() == {"arr_0", "labels"}
    for key in local:
        np.testing.assert_array_equal(remote[key], local[key])
    assert storage.read_json(f"{work}/results.json")["samples_shape"] == [10, 4, 4, 3]


def _train_cli(workdir: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "detailflow_jax.train.tokenizer", "--config",
           "configs/tokenizer_fashion_mnist.py:smoke", "--workdir", workdir]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**env, "PYTHONPATH": os.pathsep.join([repo, env.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=repo)


def test_missing_bucket_is_one_clear_line(bucket):
    proc = _train_cli("gs://no-such-bucket/run", dict(os.environ))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: bucket gs://no-such-bucket does not exist")
        and "gcloud storage buckets" in last
    )


def test_bucket_without_write_access_is_one_clear_line():
    # The emulator grants everything; this server answers as GCS does for an account without access.
    with gcs_emulator.forbidden_server() as url:
        proc = _train_cli(f"gs://{BUCKET}/run", gcs_emulator.env_with(url))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"error: cannot write to gs://{BUCKET}/run (Forbidden")
        and "write access" in last
    )


def test_image_folder_dataset_is_read_from_a_bucket(bucket, tmp_path):
    from test_data_imagefolder import _write_tree

    from detailflow_jax.data.imagefolder import build_imagefolder, open_imagefolder
    _write_tree(tmp_path / "tree")
    build_imagefolder(tmp_path / "tree", tmp_path / "tfds")
    remote = f"{bucket}/tfds"
    for file in (tmp_path / "tfds").rglob("*"):
        if file.is_file():
            storage.path(f"{remote}/{file.relative_to(tmp_path / 'tfds')}").write_bytes(
                file.read_bytes()
            )
    local, local_classes = open_imagefolder(tmp_path / "tfds", "train")
    source, classes = open_imagefolder(remote, "train")
    assert classes == local_classes == ["cat", "dog"] and len(source) == len(local) == 6
    for i in range(len(source)):
        assert source[i]["image"] == local[i]["image"] and source[i]["label"] == local[i]["label"]


def test_converters_read_a_checkpoint_file_from_a_bucket_and_write_weights_there(bucket, tmp_path):
    from detailflow_jax.params_io import restore_params, save_params
    from detailflow_jax.convert.state_dict import load_state_dict

    weights = {
        "conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "conv.bias": np.ones(2, np.float32),
    }
    storage.save_npz(f"{bucket}/downloads/model.npz", **weights)
    loaded = load_state_dict(f"{bucket}/downloads/model.npz")
    assert loaded.keys() == weights.keys()
    for key in weights:
        np.testing.assert_array_equal(loaded[key], weights[key])
    time.sleep(1.1)  # object times have a resolution of a second
    # same size
    storage.save_npz(f"{bucket}/downloads/model.npz", **{k: v + 1 for k, v in weights.items()})
    # not cached
    np.testing.assert_array_equal(load_state_dict(f"{bucket}/downloads/model.npz")["conv.bias"], 2)
    out = save_params(f"{bucket}/converted", loaded)  # orbax writes the bucket itself
    assert out == f"{bucket}/converted"
    np.testing.assert_array_equal(restore_params(out)["conv.weight"], weights["conv.weight"])


def test_fashion_mnist_on_a_bucket_says_to_mount_it():
    from detailflow_jax.config_lib import ConfigError
    from detailflow_jax.data.pipeline import default_data_config
    from detailflow_jax.data.sources import open_source
    with pytest.raises(ConfigError, match="mount the bucket"):
        open_source(
            default_data_config(name="fashion_mnist", data_dir="gs://b/fashion_mnist"), "train"
        )
