"""Image folder -> TFDS ArrayRecord -> grain pipeline, offline and without TensorFlow."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from detailflow_jax.data.imagefolder import (
    ImageFolderError,
    build_imagefolder,
    dataset_dir,
    open_imagefolder,
)

# Runs in a fresh interpreter so that "TensorFlow was never imported" is not masked by other tests'
# imports.
BUILD_AND_READ = r"""
import json, logging, sys
from detailflow_jax.data.imagefolder import build_imagefolder, open_imagefolder
from detailflow_jax.data.pipeline import default_data_config, make_eval_iter, make_train_iter

root, data_dir = sys.argv[1:3]
builder = build_imagefolder(root, data_dir)
source, class_names = open_imagefolder(data_dir, "train")
records = [source[i] for i in range(len(source))]
cfg = default_data_config(name="imagefolder", data_dir=data_dir, image_size=16, num_threads=2, prefetch=8)
train = make_train_iter(cfg, batch_size=2, seed=0, process_index=0, process_count=1)
batches = [next(train) for _ in range(6)]
val = list(make_eval_iter(cfg, batch_size=1, process_index=0, process_count=1))
print(json.dumps(dict(
    class_names=class_names,
    splits={k: v.num_examples for k, v in builder.info.splits.items()},
    build_skipped=builder.report.skipped,
    names_labels=sorted([r["file_name"].decode(), int(r["label"])] for r in records),
    batch_shapes=sorted({str(b["image"].shape) for b in batches}),
    batch_range=[float(min(b["image"].min() for b in batches)), float(max(b["image"].max() for b in batches))],
    read_skipped=train.skipped.count, read_examples=train.skipped.examples,
    val_batches=len(val), tensorflow_imported="tensorflow" in sys.modules)))
"""  # noqa: E501


def _encoded(fmt, seed, size=(24, 20)):
    buf = io.BytesIO()
    Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    ).save(buf, fmt)
    return buf.getvalue()


def _write_tree(root):
    files = {
        "train/cat/0.png": _encoded("PNG", 0), "train/cat/1.JPG": _encoded("JPEG", 1),
        "train/cat/2.png": _encoded("PNG", 2), "train/dog/0.png": _encoded("PNG", 3),
        "train/dog/1.jpeg": _encoded("JPEG", 4),
        "train/dog/bad.png": b"\x89PNG this is not an image",  # caught by verify at build time
        # passes verify, fails to decode
        "train/dog/trunc.jpg": _encoded("JPEG", 5, (64, 64))[:2500],
        "train/dog/notes.txt": b"ignored: not an image extension",
        "val/cat/0.png": _encoded("PNG", 6), "val/dog/0.png": _encoded("PNG", 7),
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_build_and_read_without_tensorflow(tmp_path):
    _write_tree(tmp_path / "tree")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", BUILD_AND_READ, str(tmp_path / "tree"), str(tmp_path / "tfds")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["tensorflow_imported"] is False
    assert out["class_names"] == ["cat", "dog"]
    assert out["splits"] == {"train": 6, "val": 2}
    assert out["build_skipped"]["train"] == ["dog/bad.png"]
    assert out["names_labels"] == [["cat/0.png", 0], ["cat/1.JPG", 0], ["cat/2.png", 0],
                                   ["dog/0.png", 1], ["dog/1.jpeg", 1], ["dog/trunc.jpg", 1]]
    assert out["batch_shapes"] == ["(2, 16, 16, 3)"]
    assert -1.0 <= out["batch_range"][0] < out["batch_range"][1] <= 1.0
    assert out["read_skipped"] >= 1 and "dog/trunc.jpg" in out["read_examples"][0]
    assert "skipping corrupt image" in done.stderr and "dog/bad.png" in done.stderr
    assert out["val_batches"] == 2
    assert (dataset_dir(tmp_path / "tfds") / "dataset_info.json").is_file()


def test_layout_errors(tmp_path):
    with pytest.raises(ImageFolderError, match="does not exist"):
        build_imagefolder(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ImageFolderError, match="has no 'train' folder"):
        build_imagefolder(tmp_path / "flat", tmp_path / "out")
    (tmp_path / "flat" / "train" / "a").mkdir(parents=True)
    (tmp_path / "flat" / "val" / "zebra").mkdir(parents=True)
    with pytest.raises(ImageFolderError, match=r"classes missing from train: \['zebra'\]"):
        build_imagefolder(tmp_path / "flat", tmp_path / "out")
    with pytest.raises(ImageFolderError, match="no built image-folder dataset"):
        dataset_dir(tmp_path / "out")


def test_a_dataset_built_from_another_tree_is_not_reused(tmp_path):
    from test_bad_inputs import assert_one_line_error, run, tree_hashes
    _write_tree(tmp_path / "tree")
    args = ("--root", str(tmp_path / "tree"), "--data_dir", str(tmp_path / "tfds"))
    first = run("detailflow_jax.data.imagefolder", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run("detailflow_jax.data.imagefolder", *args)
    assert "already built, reused" in again.stdout and "classes: 2" in again.stdout, again.stdout

    (tmp_path / "tree" / "train" / "bird").mkdir()
    (tmp_path / "tree" / "train" / "bird" / "0.png").write_bytes(_encoded("PNG", 8))
    before = tree_hashes(str(tmp_path / "tfds"))
    refused = run("detailflow_jax.data.imagefolder", *args)
    assert_one_line_error(refused, "was built from another tree", "2 classes (cat, dog)",
                          "3 classes (bird, cat, dog)", "--rebuild")
    assert tree_hashes(str(tmp_path / "tfds")) == before

    rebuilt = run("detailflow_jax.data.imagefolder", *args, "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert "train: 7 examples" in rebuilt.stdout and "classes: 3" in rebuilt.stdout, rebuilt.stdout
    source, class_names = open_imagefolder(tmp_path / "tfds", "train")
    assert class_names == ["bird", "cat", "dog"] and len(source) == 7
