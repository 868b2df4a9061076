"""The quality check: classifier training, accuracy vs requested labels, Fréchet distance, and the
report.

Synthetic data: three classes of noisy stripes (horizontal, vertical, diagonal) with random phase,
which a CNN separates after a few dozen steps. One classifier is trained per session and shared by
every test.
"""

import json

import numpy as np
import pytest

from detailflow_jax.data.pipeline import default_data_config
from detailflow_jax.eval import classifier, quality

NUM_SYNTHETIC_CLASSES = 3


def stripes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (n, 32, 32, 3) images in [-1, 1], int labels (n,)) of noisy stripes, one orientation
    per class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_SYNTHETIC_CLASSES, n)
    yy, xx = np.mgrid[:32, :32].astype(np.float32)
    coordinate = np.stack([yy, xx, (xx + yy) / np.sqrt(2)])[labels]  # (n, 32, 32)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    gray = 0.7 * np.sin(0.8 * coordinate + phase) + 0.3 * rng.standard_normal((n, 32, 32))
    images = np.repeat(np.clip(gray, -1, 1)[..., None], 3, axis=-1).astype(np.float32)
    return images, labels


@pytest.fixture(scope="module")
def trained():
    images, labels = stripes(512, seed=0)
    return classifier.train_classifier(
        images, labels, steps=120, batch_size=32, seed=0, log_every=0
    )


@pytest.fixture(scope="module")
def held_out():
    return stripes(400, seed=1)


def test_classifier_learns_synthetic_classes(trained, held_out):
    images, labels = held_out
    assert classifier.accuracy(trained, images, labels) >= 0.95
    untrained = classifier.init_params(seed=0)
    assert classifier.accuracy(untrained, images, labels) < 0.8


def test_uint8_and_float_inputs_agree(trained, held_out):
    images = held_out[0][:50]
    as_uint8 = np.clip(np.rint((images + 1) * 127.5), 0, 255).astype(np.uint8)
    a = classifier.classify(trained, images)
    b = classifier.classify(trained, as_uint8)
    assert a["features"].shape == (50, classifier.FEATURE_DIM)
    assert a["logits"].shape == (50, classifier.NUM_CLASSES)
    np.testing.assert_allclose(
        a["features"], b["features"], atol=0.05 * np.abs(a["features"]).max()
    )


def test_accuracy_follows_requested_labels(trained, held_out):
    images, labels = held_out
    correct = quality.score_images(trained, images, labels)
    shuffled = quality.score_images(trained, images, np.random.default_rng(0).permutation(labels))
    wrong = quality.score_images(trained, images, (labels + 1) % NUM_SYNTHETIC_CLASSES)
    assert correct["accuracy"] >= 0.95
    assert 0.15 < shuffled["accuracy"] < 0.55  # chance is ~1/3
    assert wrong["accuracy"] <= 0.05
    assert correct["count"] == len(labels)


def test_frechet_distance_zero_for_same_set_and_grows_with_shift(trained, held_out):
    images, labels = held_out
    features = quality.score_images(trained, images, labels)["features"]
    reference = quality.feature_stats(features)
    same = quality.features_frechet_distance(features, reference)
    fresh_images, fresh_labels = stripes(400, seed=2)
    fresh = quality.features_frechet_distance(
        quality.score_images(trained, fresh_images, fresh_labels)["features"], reference)
    shifted = [
        quality.features_frechet_distance(
            quality.score_images(trained, np.clip(images + delta, -1, 1), labels)["features"],
            reference,
        )
        for delta in (0.3, 0.6)
    ]
    # same set: 0 up to eigen-solver round-off
    assert abs(same) < 1e-3 < fresh < shifted[0] < shifted[1]


def test_quality_report_rows_json_and_table(trained, held_out, tmp_path, capsys):
    real_images, real_labels = stripes(200, seed=3)
    images, labels = held_out
    blurred = (
        images + np.roll(images, 1, 1) + np.roll(images, 1, 2) + np.roll(images, (1, 1), (1, 2))
    ) / 4
    mislabelled = (images[:30], (labels[:30] + 1) % NUM_SYNTHETIC_CLASSES)
    rows = {"exact": (images, labels), "blurred": (blurred, labels), "mislabelled": mislabelled}
    path = tmp_path / "quality.json"
    report = quality.quality_report(
        trained, rows, real_images, real_labels, classifier_accuracy=0.9, path=path
    )

    assert json.loads(path.read_text()) == report
    assert list(report["rows"]) == [quality.REAL_ROW, "exact", "blurred", "mislabelled"]
    assert report["reference"]["count"] == 100
    assert report["classifier"] == {"test_accuracy": 0.9, "feature_dim": classifier.FEATURE_DIM}
    counts = {name: row["count"] for name, row in report["rows"].items()}
    assert counts == {quality.REAL_ROW: 100, "exact": 400, "blurred": 400, "mislabelled": 30}

    (ref_images, _), (held_images, held_labels) = quality.split_real(real_images, real_labels)
    reference = quality.feature_stats(classifier.classify(trained, ref_images)["features"])
    exact = quality.score_images(trained, images, labels)
    assert report["rows"]["exact"]["accuracy"] == exact["accuracy"]
    assert report["rows"]["exact"]["frechet_distance"] == pytest.approx(
        quality.features_frechet_distance(exact["features"], reference), rel=1e-9)
    assert report["rows"][quality.REAL_ROW]["accuracy"] == classifier.accuracy(
        trained, held_images, held_labels
    )
    assert report["rows"]["mislabelled"]["accuracy"] <= 0.1
    assert (
        report["rows"]["blurred"]["frechet_distance"] > report["rows"]["exact"]["frechet_distance"]
    )

    table = capsys.readouterr().out
    assert "90.00% held-out accuracy" in table and "vs 100 real test images" in table
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 4
    assert len({line.index("%") for line in lines[2:]}) == 1  # columns aligned
    assert lines[-1].startswith("mislabelled") and lines[-1].rstrip().endswith("30")


def test_bad_inputs_are_explained(trained):
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
        classifier.classify(trained, np.zeros((4, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match="dtype int64"):
        classifier.classify(trained, np.zeros((4, 32, 32, 3), np.int64))
    with pytest.raises(ValueError, match="one requested class per image"):
        quality.score_images(trained, np.zeros((4, 32, 32, 3), np.uint8), np.zeros(3))
    with pytest.raises(ValueError, match="reserved"):
        quality.quality_report(
            trained,
            {quality.REAL_ROW: (None, None)},
            np.zeros((8, 32, 32, 3), np.uint8),
            np.zeros(8),
            echo=False,
        )


def test_load_or_train_trains_once_then_restores(tmp_path):
    # The synthetic source (what smoke runs use) stands in for Fashion-MNIST; 64 images cap the
    # batch at 64.
    data_cfg = default_data_config(
        name="synthetic", image_size=32, synthetic_examples=64, num_threads=2
    )
    params, info = classifier.load_or_train_classifier(tmp_path, data_cfg, steps=3)
    assert set(info) == {
        "test_accuracy",
        "train_seconds",
        "steps",
        "batch_size",
        "seed",
        "test_images",
    }
    assert (info["steps"], info["batch_size"], info["test_images"]) == (3, 64, 64)
    val_images, val_labels = classifier.load_split(data_cfg, "val")
    assert info["test_accuracy"] == classifier.accuracy(params, val_images, val_labels)
    assert (tmp_path / classifier.CLASSIFIER_DIR / "params").is_dir()

    # no training
    restored, restored_info = classifier.load_or_train_classifier(tmp_path, data_cfg, steps=1000)
    assert restored_info == info
    np.testing.assert_array_equal(classifier.classify(restored, val_images)["logits"],
                                  classifier.classify(params, val_images)["logits"])
    with pytest.raises(ValueError, match="takes 32x32 images"):
        classifier.load_or_train_classifier(
            tmp_path, default_data_config(name="synthetic", image_size=64)
        )
