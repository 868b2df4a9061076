"""grain pipeline: per-process slicing, determinism, exact resume (state and orbax), corrupt-image
skipping, eval."""

import io
import logging

import grain
import numpy as np
import pytest
from PIL import Image

from detailflow_jax.config_lib import ConfigError
from detailflow_jax.data import pipeline
from detailflow_jax.data.pipeline import default_data_config, make_eval_iter, make_train_iter

SMALL = dict(name="synthetic", image_size=8, synthetic_examples=24, num_threads=2, prefetch=8)


def _cfg(**overrides):
    return default_data_config(**{**SMALL, **overrides})


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _indices(batches):
    return np.concatenate([b["index"] for b in batches])


def test_batch_format():
    batch = next(make_train_iter(_cfg(), batch_size=4, seed=0))
    assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == np.int32 and batch["index"].shape == (4,)


def test_process_slices_are_disjoint_and_cover_each_epoch():
    # 24 images, 3 processes, global batch 12 -> 4 per process -> 2 batches per process per epoch.
    streams = [
        make_train_iter(_cfg(), 12, seed=3, process_index=p, process_count=3) for p in range(3)
    ]
    for epoch in range(2):
        parts = [_indices(_take(s, 2)) for s in streams]
        assert sorted(np.concatenate(parts).tolist()) == list(range(24)), f"epoch {epoch}"
        if epoch == 0:
            first = parts
    assert any(not np.array_equal(a, b) for a, b in zip(first, parts)), (
        "epochs must be shuffled differently"
    )


def test_same_seed_same_batches_other_seed_differs():
    a = _take(make_train_iter(_cfg(), 4, seed=5), 3)
    b = _take(make_train_iter(_cfg(), 4, seed=5), 3)
    c = _take(make_train_iter(_cfg(), 4, seed=6), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["index"], y["index"])
    assert not np.array_equal(_indices(a), _indices(c))


def _assert_same_batches(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_resume_from_iterator_state_is_exact():
    stream = make_train_iter(_cfg(), 4, seed=1)
    _take(stream, 7)  # crosses the first epoch boundary (6 batches per epoch)
    state = stream.iterator.get_state()
    expected = _take(stream, 3)
    resumed = make_train_iter(_cfg(), 4, seed=1)
    resumed.iterator.set_state(state)
    _assert_same_batches(expected, _take(resumed, 3))


def test_resume_through_orbax_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    stream = make_train_iter(_cfg(), 4, seed=2)
    _take(stream, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",)) as manager:
        manager.save(
            2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(stream.iterator))
        )
        manager.wait_until_finished()
    expected = _take(stream, 2)
    resumed = make_train_iter(_cfg(), 4, seed=2)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",)) as manager:
        manager.restore(
            2,
            args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed.iterator)),
        )
    _assert_same_batches(expected, _take(resumed, 2))


class _BytesSource:
    """Encoded images, one of them truncated (passes PIL's verify, fails to decode)."""

    def __init__(self, n=12, corrupt=5):
        self.records = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8)).save(
                buf, "JPEG"
            )
            data = buf.getvalue()
            self.records.append(
                {
                    "image": data[: len(data) * 3 // 4] if i == corrupt else data,
                    "label": i % 3,
                    "file_name": f"c/{i}.jpg",
                }
            )

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def test_corrupt_image_is_counted_and_skipped_with_a_warning(caplog):
    counter = pipeline.SkipCounter()
    ds = pipeline.train_dataset(
        _BytesSource(),
        _cfg(image_size=16),
        batch_size=4,
        seed=0,
        process_index=0,
        process_count=1,
        counter=counter,
    )
    with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
        batches = _take(iter(ds), 6)  # two epochs of the 11 good images
    assert all(b["image"].shape == (4, 16, 16, 3) for b in batches)  # batches stay full
    assert 5 not in _indices(batches)
    assert counter.count >= 2 and "c/5.jpg" in counter.examples[0]
    assert "c/5.jpg" in caplog.text


def test_mostly_corrupt_data_raises_instead_of_spinning():
    source = [{"image": b"garbage", "label": 0, "file_name": f"x/{i}"} for i in range(10)]
    ds = pipeline.train_dataset(
        source,
        _cfg(),
        batch_size=2,
        seed=0,
        process_index=0,
        process_count=1,
        counter=pipeline.SkipCounter(),
    )
    # 1,000 warnings are not the point here
    logging.getLogger(pipeline.__name__).setLevel(logging.ERROR)
    try:
        with pytest.raises(ValueError, match="skipped 100.00 %"):
            next(iter(ds))
    finally:
        logging.getLogger(pipeline.__name__).setLevel(logging.NOTSET)


def test_eval_is_ordered_and_equal_across_processes():
    cfg = _cfg(synthetic_examples=11)
    parts = [
        _indices(
            list(make_eval_iter(cfg, 3, process_index=p, process_count=3, drop_remainder=False))
        )
        for p in range(3)
    ]
    assert [len(p) for p in parts] == [3, 3, 3]  # 11 -> 9 (a multiple of 3 processes); 3 each
    assert sorted(np.concatenate(parts).tolist()) == list(range(9))
    np.testing.assert_array_equal(parts[1], [1, 4, 7])


def test_eval_ten_crop_shape():
    # centre crop 17, then 16
    batch = next(make_eval_iter(_cfg(eval_crop="ten_crop", image_size=16), 2))
    assert batch["image"].shape == (2, 10, 16, 16, 3)
    # The mirror image's top-left view is the mirrored top-right view.
    np.testing.assert_array_equal(batch["image"][:, 5], batch["image"][:, 1, :, ::-1])
    assert not np.array_equal(batch["image"][:, 0], batch["image"][:, 1])


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown data config fields"):
        default_data_config(image_sise=8)
    with pytest.raises(ConfigError, match="data.train_crop"):
        make_train_iter(_cfg(train_crop="random"), 4, seed=0)
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        make_train_iter(_cfg(), 4, seed=0, process_index=0, process_count=3)
    with pytest.raises(ConfigError, match="data.pad_to"):
        make_train_iter(_cfg(pad_to=32), 4, seed=0)
    from detailflow_jax.data.imagefolder import ImageFolderError
    with pytest.raises(ImageFolderError, match="python -m detailflow_jax.data.imagefolder"):
        make_train_iter(_cfg(name="imagefolder", data_dir=str(tmp_path)), 4, seed=0)
