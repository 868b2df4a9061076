"""Checkpoints are checked: checksums written at save and verified at restore, a damaged latest step
falls back to the newest intact one (named in a warning, moved aside, nothing deleted), restored
values must be finite."""

import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.checkpoint import CHECKSUM_FILE, CheckpointError, Checkpointer
from detailflow_jax.inference.weights import checkpoint_step, restore_entry


def _weights(value: float) -> np.ndarray:
    # does not compress away
    return np.sin(np.arange(64 * 64, dtype=np.float32).reshape(64, 64)) + value


def _state(value: float) -> dict:
    return {"params": {"w": jnp.asarray(_weights(value))}, "step": jnp.int32(int(value))}


def _save(directory: str, steps=(1, 2)) -> None:
    ckpt = Checkpointer(directory)
    for step in steps:
        ckpt.save(step, _state(float(step)))
    ckpt.close()


def _largest_file(step_dir: str) -> str:
    files = [
        os.path.join(d, f)
        for d, _, names in os.walk(step_dir)
        for f in names
        if not f.startswith("sha256")
    ]
    return max(files, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garble(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 3)
        f.write(os.urandom(400)[:max(1, os.path.getsize(path) // 3)])


def _flip_bit(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 1]))


def test_every_saved_step_gets_checksums(tmp_path):
    _save(str(tmp_path))
    for step in (1, 2):
        assert os.path.isfile(tmp_path / str(step) / CHECKSUM_FILE.format(0))


@pytest.mark.parametrize(
    "damage", [_truncate, _garble, _flip_bit], ids=["truncated", "garbled", "flipped_bit"]
)
def test_a_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    _save(str(tmp_path))
    damage(_largest_file(str(tmp_path / "2")))
    ckpt = Checkpointer(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        state = ckpt.restore(_state(0.0))
    assert ckpt.restored_step == 1
    np.testing.assert_array_equal(state["params"]["w"], _weights(1.0))
    assert "checkpoint step 2" in caplog.text and "damaged" in caplog.text
    assert ckpt.latest_step() == 1 and os.path.isdir(tmp_path / "2.damaged")  # kept for inspection
    ckpt.close()


def test_a_stray_empty_step_folder_does_not_block_resume(tmp_path, caplog):
    _save(str(tmp_path))
    os.makedirs(tmp_path / "50")
    ckpt = Checkpointer(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        ckpt.restore(_state(0.0))
    assert ckpt.restored_step == 2 and "checkpoint step 50" in caplog.text
    ckpt.close()


def test_a_non_finite_checkpoint_is_not_restored(tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, _state(1.0))
    ckpt.save(2, {"params": {"w": jnp.full((64, 64), jnp.nan)}, "step": jnp.int32(2)})
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        ckpt.restore(_state(0.0))
    assert ckpt.restored_step == 1 and "NaN/inf in ['params']['w']" in caplog.text
    ckpt.close()


def test_no_intact_step_is_one_clear_error(tmp_path):
    _save(str(tmp_path), steps=(1,))
    _flip_bit(_largest_file(str(tmp_path / "1")))
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*step 1: .*SHA-256"):
        Checkpointer(str(tmp_path)).restore(_state(0.0))
    assert os.path.isdir(tmp_path / "1")  # nothing moved when nothing could be restored


def test_readers_fall_back_without_moving_anything(tmp_path):
    _save(str(tmp_path / "checkpoints"))
    _flip_bit(_largest_file(str(tmp_path / "checkpoints" / "2")))
    w = restore_entry(str(tmp_path), "params", {"w": jnp.zeros((64, 64))})["w"]
    np.testing.assert_array_equal(w, _weights(1.0))
    assert os.path.isdir(tmp_path / "checkpoints" / "2")


def test_the_step_readers_report_skips_damaged_and_empty_steps(tmp_path):
    _save(str(tmp_path / "checkpoints"), steps=(1, 2, 3))
    _flip_bit(_largest_file(str(tmp_path / "checkpoints" / "3")))
    os.makedirs(tmp_path / "checkpoints" / "50")
    assert checkpoint_step(str(tmp_path)) == 2
