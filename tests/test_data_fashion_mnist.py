"""Fashion-MNIST IDX reader and source, on small IDX files written here (raw and gzipped)."""

import gzip

import numpy as np
import pytest

from detailflow_jax.data import fashion_mnist
from detailflow_jax.data.fashion_mnist import FashionMnistError, FashionMnistSource, read_idx


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def _write_split(directory, prefix, n, rng, gz):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    for stem, array in (
        (f"{prefix}-images-idx3-ubyte", images),
        (f"{prefix}-labels-idx1-ubyte", labels),
    ):
        data = _idx_bytes(array)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / stem).write_bytes(data)
    return images, labels


@pytest.fixture
def no_system_copy(monkeypatch, tmp_path):
    """Hide the apt-installed files and the env var so only what a test writes is found."""
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)


@pytest.mark.parametrize("gz", [False, True])
def test_reads_idx_files(tmp_path, no_system_copy, gz):
    rng = np.random.default_rng(0)
    train_images, train_labels = _write_split(tmp_path, "train", 6, rng, gz)
    _write_split(tmp_path, "t10k", 3, rng, not gz)  # mixed raw/gz in one folder is fine
    source = FashionMnistSource("train", tmp_path, rgb=False)
    assert len(source) == 6 and len(FashionMnistSource("test", tmp_path)) == 3
    record = source[4]
    np.testing.assert_array_equal(record["image"][..., 0], train_images[4])
    assert record["image"].shape == (28, 28, 1) and record["label"] == train_labels[4]


def test_pad_and_rgb(tmp_path, no_system_copy):
    images, _ = _write_split(tmp_path, "train", 2, np.random.default_rng(1), True)
    _write_split(tmp_path, "t10k", 1, np.random.default_rng(2), True)
    image = FashionMnistSource("train", tmp_path, pad_to=32, rgb=True)[1]["image"]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[2:30, 2:30, 1], images[1])
    assert not image[:2].any() and not image[:, 30:].any()
    with pytest.raises(ValueError, match="smaller than"):
        FashionMnistSource("train", tmp_path, pad_to=20)


def test_env_var_directory(tmp_path, no_system_copy, monkeypatch):
    _write_split(tmp_path, "train", 2, np.random.default_rng(0), True)
    _write_split(tmp_path, "t10k", 2, np.random.default_rng(0), True)
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    assert FashionMnistSource("test").directory == tmp_path


def test_missing_files_name_both_fixes(tmp_path, no_system_copy):
    with pytest.raises(FashionMnistError) as err:
        FashionMnistSource("train", tmp_path)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and fashion_mnist.ENV_VAR in message
    with pytest.raises(ValueError, match="does not exist"):
        FashionMnistSource("val", tmp_path)


def test_bad_idx_file_is_named(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(FashionMnistError, match="unsigned-byte IDX"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(FashionMnistError, match="declares shape"):
        read_idx(tmp_path / "short")


@pytest.mark.skipif(
    not fashion_mnist.SYSTEM_DIR.is_dir(), reason="apt package dataset-fashion-mnist not installed"
)
def test_apt_installed_files():
    train, test = FashionMnistSource("train"), FashionMnistSource("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert set(np.unique(train.labels)) == set(range(10))


def test_feeds_the_shared_pipeline(tmp_path, no_system_copy):
    from detailflow_jax.data.pipeline import default_data_config, make_eval_iter, make_train_iter
    _write_split(tmp_path, "train", 8, np.random.default_rng(0), True)
    _write_split(tmp_path, "t10k", 4, np.random.default_rng(1), True)
    cfg = default_data_config(
        name="fashion_mnist", data_dir=str(tmp_path), image_size=32, pad_to=32, num_threads=0
    )
    train = make_train_iter(cfg, 4, seed=0, process_index=0, process_count=1)
    assert next(train)["image"].shape == (4, 32, 32, 3) and train.num_classes == 10
    test = make_eval_iter(cfg, 4, process_index=0, process_count=1)
    assert next(test)["image"].shape == (4, 32, 32, 3) and test.num_examples == 4
