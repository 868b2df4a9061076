"""Image resizing that reproduces PyTorch's ``F.interpolate`` exactly
(docs/model.md#pytorch-exact-resampling).

``jax.image.resize`` does not match torch for the two modes DetailFlow needs: torch ``area`` is
adaptive average pooling (not an antialiased linear filter) and torch ``bicubic`` uses the Keys
kernel with a = -0.75 (JAX uses a = -0.5). Both are separable linear maps with static sizes, so we
build the (out x in) weight matrix of each axis once in numpy with PyTorch's formulas and apply it
with two einsums: exact, jit-friendly and cheap.

All functions take NHWC images; the einsums run at HIGHEST precision so accelerators do not drop to
bf16/TF32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_BICUBIC_A = -0.75  # PyTorch's upsample_bicubic2d constant


@functools.lru_cache(maxsize=None)
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch ``adaptive_avg_pool``: output i averages inputs floor(i*in/out) ..
    ceil((i+1)*in/out) - 1."""
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    return m.astype(np.float32)


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 around a fractional
    position t."""
    a = np.float32(_BICUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch ``bicubic`` with align_corners=False, no antialias, border taps
    clamped.

    The source position and the tap weights are computed in float32 like torch's kernels (float64
    positions are off by up to 6e-6 after a 256 -> 96 -> 224 round trip; float32 ones by 1e-6).
    """
    f32 = np.float32
    m = np.zeros((out_size, in_size), np.float32)
    scale = f32(in_size) / f32(out_size)
    for i in range(out_size):
        # not clamped at 0 for cubic (area_pixel_compute_source_index)
        src = scale * (f32(i) + f32(0.5)) - f32(0.5)
        base = int(np.floor(src))
        for offset, w in zip((-1, 0, 1, 2), _cubic_weights(src - f32(base))):
            m[i, min(max(base + offset, 0), in_size - 1)] += w
    return m


def apply_separable(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """y[b] = rows @ x[b] @ cols^T per channel, for NHWC x, (out_h, H) rows and (out_w, W) cols."""
    hp = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,bhwc->bowc", jnp.asarray(rows, x.dtype), x, precision=hp)
    return jnp.einsum("pw,bowc->bopc", jnp.asarray(cols, x.dtype), y, precision=hp)


def _check(x: jax.Array, out_hw) -> tuple[int, int]:
    if x.ndim != 4:
        raise ValueError(f"expected an NHWC image batch, got shape {x.shape}")
    out_h, out_w = (int(s) for s in out_hw)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be positive, got {out_hw}")
    return out_h, out_w


def area_resize(x: jax.Array, out_hw) -> jax.Array:
    """torch ``F.interpolate(x, size=out_hw, mode='area')`` on an NHWC batch."""
    out_h, out_w = _check(x, out_hw)
    return apply_separable(x, area_matrix(x.shape[1], out_h), area_matrix(x.shape[2], out_w))


def bicubic_resize(x: jax.Array, out_hw) -> jax.Array:
    """torch ``F.interpolate(x, size=out_hw, mode='bicubic', align_corners=False)`` on an NHWC
    batch."""
    out_h, out_w = _check(x, out_hw)
    return apply_separable(x, bicubic_matrix(x.shape[1], out_h), bicubic_matrix(x.shape[2], out_w))
