"""Float -> uint8 pixels in the official arithmetic: bfloat16 for the bf16 decoder's output, float32
otherwise."""

import jax
import ml_dtypes
import numpy as np
import pytest

from detailflow_jax.pixels import round_to_bfloat16, to_uint8


def torch_bf16_reference(x: np.ndarray) -> np.ndarray:
    """``clamp(127.5 * x + 128, 0, 255).to(uint8)`` on a bfloat16 tensor, written with ml_dtypes'
    bfloat16 numpy type: every operation rounds its result to bfloat16, as torch's bf16 kernels
    do."""
    bf16 = ml_dtypes.bfloat16
    y = x.astype(bf16) * bf16(127.5) + bf16(128.0)
    assert y.dtype == bf16
    return np.clip(y.astype(np.float32), 0, 255).astype(np.uint8)


def test_bfloat16_arithmetic_matches_per_operation_rounding():
    x = np.concatenate([np.linspace(-1.1, 1.1, 200_001, dtype=np.float32),
                        np.random.default_rng(0).uniform(-1, 1, 100_000).astype(np.float32)])
    np.testing.assert_array_equal(np.asarray(to_uint8(x)), torch_bf16_reference(x))
    # XLA keeps it
    np.testing.assert_array_equal(np.asarray(jax.jit(to_uint8)(x)), torch_bf16_reference(x))


def test_rounding_and_truncation_differ_where_expected():
    # 127.5 * 0.5 + 128 = 191.75: bfloat16 has spacing 1 above 128, so it rounds to 192; float32
    # truncates to 191.
    x = np.array([0.5, -1.0, 0.0, 1.0, -2.0, 2.0], np.float32)
    assert np.asarray(to_uint8(x)).tolist() == [192, 0, 128, 255, 0, 255]
    assert np.asarray(to_uint8(x, "float32")).tolist() == [191, 0, 128, 255, 0, 255]
    # A real image read from uint8 as u / 127.5 - 1 comes back to u in float32 (u + 0.5, truncated).
    u = np.arange(256, dtype=np.float32)
    np.testing.assert_array_equal(
        np.asarray(to_uint8(u / 127.5 - 1, "float32")), u.astype(np.uint8)
    )
    # Over a dense grid, the two arithmetics disagree on a large share of values (the official path
    # rounds).
    grid = np.linspace(-1, 1, 10_001, dtype=np.float32)
    assert np.mean(np.asarray(to_uint8(grid)) != np.asarray(to_uint8(grid, "float32"))) > 0.2


def test_round_to_bfloat16_is_nearest_even():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -9, -3.3, 1e-30], np.float32)
    expected = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(round_to_bfloat16(x)), expected)
    assert expected[1] == 1.0 and expected[2] == 1.0 + 2 ** -6  # both ties go to the even neighbour


def test_unknown_arithmetic_is_refused():
    with pytest.raises(ValueError, match="arithmetic='float16'"):
        to_uint8(np.zeros(3), "float16")
