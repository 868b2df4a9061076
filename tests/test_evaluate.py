"""Generation evaluation: label lists, resumable chunked sampling, the ADM npz, and the command end
to end (tiny GPT and tokenizer with random weights, the fixture FID Inception, an 8-image reference
batch)."""

import json
import sys

import jax
import numpy as np
import pytest

from detailflow_jax.eval import evaluate
from detailflow_jax.eval.evaluate import (
    ChunkPlan,
    ResumeError,
    generate_chunks,
    make_labels,
    write_adm_npz,
)

sys.path.insert(0, ".")


def test_label_modes():
    per_class = make_labels(50 * 10, 10, "per_class", seed=3)
    assert np.array_equal(np.bincount(per_class, minlength=10), np.full(10, 50))
    # Interleaved, so every Inception-Score split sees all classes equally often.
    assert np.array_equal(per_class[:20], np.tile(np.arange(10), 2))
    assert np.array_equal(make_labels(25, 10, "per_class", seed=0)[20:], np.arange(5))

    random = make_labels(5000, 10, "random", seed=3)
    assert np.array_equal(random, make_labels(5000, 10, "random", seed=3))
    assert not np.array_equal(random, make_labels(5000, 10, "random", seed=4))
    counts = np.bincount(random, minlength=10)
    # uniform, not balanced exactly
    assert counts.min() > 400 and counts.max() < 600 and len(counts) == 10
    assert not np.array_equal(counts, np.full(10, 500))
    with pytest.raises(ValueError, match="label mode"):
        make_labels(10, 10, "balanced", seed=0)


class FakeGenerator:
    """Images as a deterministic function of (labels, key), counting calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, labels, key):
        self.calls += 1
        noise = np.asarray(jax.random.randint(key, (len(labels), 4, 4, 3), 0, 200))
        return (noise + labels[:, None, None, None]).astype(np.uint8)


def test_resumed_run_writes_the_uninterrupted_samples(tmp_path):
    # chunks of 4, 4, 2; last batch full
    plan = ChunkPlan(num_samples=10, chunk_size=4, batch_size=2, seed=7)
    labels = make_labels(plan.num_samples, 5, "random", plan.seed)

    whole = FakeGenerator()
    assert generate_chunks(whole, plan, labels, str(tmp_path / "a"))["complete"]
    interrupted = FakeGenerator()
    first = generate_chunks(interrupted, plan, labels, str(tmp_path / "b"), stop_after_chunks=1)
    assert not first["complete"] and first["generated"] == 4
    assert sorted(p.name for p in (tmp_path / "b" / "chunks").iterdir()) == ["chunk_00000.npz"]
    second = generate_chunks(interrupted, plan, labels, str(tmp_path / "b"))
    assert second["complete"] and second["generated"] == 6  # the finished chunk was skipped
    assert interrupted.calls == whole.calls == 5

    shapes = [write_adm_npz(str(tmp_path / f"{d}.npz"), str(tmp_path / d), plan) for d in "ab"]
    assert shapes == [(10, 4, 4, 3)] * 2
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz") as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (10, 4, 4, 3)
        np.testing.assert_array_equal(data["labels"], labels)

    # A chunk whose labels do not match (e.g. another seed) is regenerated, not reused.
    other = make_labels(plan.num_samples, 5, "random", seed=8)
    redo = FakeGenerator()
    assert generate_chunks(redo, plan, other, str(tmp_path / "b"))["generated"] == 10


def test_resume_with_other_settings_is_refused(tmp_path):
    settings = {k: 1 for k in evaluate.GENERATION_KEYS}
    evaluate.check_settings(str(tmp_path), settings)
    evaluate.check_settings(str(tmp_path), dict(settings))
    with pytest.raises(ResumeError, match="cfg_scale: 1 -> 2"):
        evaluate.check_settings(str(tmp_path), {**settings, "cfg_scale": 2})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, large_fixtures):
    """Converted-style parameter directories of a tiny GPT / tokenizer and an 8-image ADM reference
    batch."""
    from configs import gpt as gpt_configs
    from configs import tokenizer as tokenizer_configs
    from flax import linen as nn

    from detailflow_jax.ar.model import GPT, init_params as gpt_init
    from detailflow_jax.convert.inception import load_inception_params
    from detailflow_jax.params_io import save_params
    from detailflow_jax.nn.inception import InceptionFeatures
    from detailflow_jax.eval.reference_stats import compute_reference_batch, save_reference_batch
    from detailflow_jax.sharding import make_mesh
    from detailflow_jax.tokenizer.model import init_params as tokenizer_init

    root = tmp_path_factory.mktemp("evaluate")
    gpt_cfg = gpt_configs.model_config(gpt_configs.get_config("tiny"))
    params = nn.unbox(jax.jit(lambda key: gpt_init(GPT(gpt_cfg), key))(jax.random.key(0)))
    # The output layer starts at zero (uniform logits); perturb it so the samples depend on the
    # class.
    params["output"]["kernel"] = jax.random.normal(
        jax.random.key(1), params["output"]["kernel"].shape
    )
    save_params(root / "gpt", params)
    tokenizer_cfg = tokenizer_configs.model_config("tiny")
    save_params(
        root / "tok", jax.jit(lambda key: tokenizer_init(tokenizer_cfg, key))(jax.random.key(2))
    )

    inception = large_fixtures / "fid_inception" / "inception_state_dict_fp16.npz"
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    np.savez(root / "real.npz", arr_0=images)
    # The command's extractor (all devices, ADM preprocessing): the compiled function is shared.
    extractor = InceptionFeatures(
        load_inception_params(inception), mesh=make_mesh((-1, 1, 1)), preprocess="adm"
    )
    save_reference_batch(
        root / "ref.npz", compute_reference_batch(str(root / "real.npz"), extractor, 8)
    )
    return root, inception


def _argv(root, inception, out, *extra):
    return [
        "--gpt",
        str(root / "gpt"),
        "--gpt_config",
        "configs/gpt.py:tiny",
        "--tokenizer",
        str(root / "tok"),
        "--tokenizer_config",
        "configs/tokenizer.py:tiny",
        "--inception",
        str(inception),
        "--reference",
        str(root / "ref.npz"),
        "--out",
        str(out),
        "--num_samples",
        "12",
        "--batch_size",
        "8",
        "--chunk_size",
        "8",
        "--inception_batch_size",
        "8",
        "--cfg_scale",
        "1.5",
        "--top_k",
        "16",
        "--seed",
        "5",
        *extra,
    ]


def test_command_end_to_end_with_resume(tiny_run, tmp_path, capsys):
    root, inception = tiny_run
    out = tmp_path / "resumed"
    assert evaluate.main(_argv(root, inception, out, "--stop_after_chunks", "1")) is None
    assert [p.name for p in (out / "chunks").iterdir()] == ["chunk_00000.npz"]
    assert not (out / "results.json").exists()

    results = evaluate.main(_argv(root, inception, out))
    printed = capsys.readouterr().out
    assert "labels: random" in printed and "FID" in printed

    saved = json.loads((out / "results.json").read_text())
    settings = saved["settings"]
    assert (
        settings["label_mode"] == "random"
        and settings["num_samples"] == 12
        and settings["seed"] == 5
    )
    assert (
        settings["cfg_scale"],
        settings["top_k"],
        settings["top_p"],
        settings["temperature"],
    ) == (1.5, 16, 1.0, 1.0)
    assert settings["gpt"] == str(root / "gpt") and settings["tokenizer"] == str(root / "tok")
    metrics = saved["metrics"]
    assert metrics == results["metrics"] and metrics["num_samples"] == 12
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert np.isfinite(metrics[key]), key
    assert metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert (
        saved["throughput"]["sampling_images_per_s"] > 0
        and saved["throughput"]["inception_images_per_s"] > 0
    )

    # The uninterrupted run (samples only) writes the same images.
    whole = tmp_path / "whole"
    assert evaluate.main(_argv(root, inception, whole, "--no_metrics"))["metrics"] is None
    with np.load(out / "samples_12.npz") as a, np.load(whole / "samples_12.npz") as b:
        assert a["arr_0"].shape == (12, 64, 64, 3) and a["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["labels"], make_labels(12, 10, "random", 5))
        assert len(np.unique(a["arr_0"].reshape(12, -1), axis=0)) == 12

    with pytest.raises(ResumeError, match="label_mode"):
        evaluate.main(_argv(root, inception, out, "--labels", "per_class"))
