"""SSIM (Wang et al. 2004) in JAX, per image, for NHWC batches.

Two settings:
  * ``STANDARD``: Gaussian window 11 / sigma 1.5, K1 = 0.01, K2 = 0.03, population (co)variances,
    data range 1 on [0, 1] images — the definition of the paper, ``tf.image.ssim`` and
    pytorch-msssim.
  * ``OFFICIAL``: what DetailFlow's ``inference/reconstruct_vq.py`` computes:
    ``skimage.metrics.structural_similarity( restored, gt, channel_axis=-1, data_range=2.0)`` on [0,
    1] images, i.e. skimage's defaults (7x7 uniform window, sample covariance N/(N-1)) with a data
    range of 2, which makes C1, C2 four times too large and SSIM too high
    (docs/fidelity.md#evaluation). Use it only to compare with the paper's numbers.

Like skimage, statistics are only taken where the whole window fits in the image (valid filtering,
equivalent to skimage's filter-then-crop), and the map is averaged over positions and channels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SSIMSettings:
    window: str = "gaussian"  # "gaussian" | "uniform"
    win_size: int = 11
    sigma: float = 1.5
    k1: float = 0.01
    k2: float = 0.03
    data_range: float = 1.0
    sample_covariance: bool = False


STANDARD = SSIMSettings()
OFFICIAL = SSIMSettings(window="uniform", win_size=7, data_range=2.0, sample_covariance=True)


def _window(settings: SSIMSettings) -> np.ndarray:
    if settings.window == "uniform":
        w = np.ones(settings.win_size)
    elif settings.window == "gaussian":
        x = np.arange(settings.win_size) - (settings.win_size - 1) / 2
        w = np.exp(-x ** 2 / (2 * settings.sigma ** 2))
    else:
        raise ValueError(f"SSIM window {settings.window!r}: use 'gaussian' or 'uniform'")
    return w / w.sum()


def _valid_filter_matrix(size: int, window: np.ndarray) -> np.ndarray:
    """(size - win + 1, size) banded matrix: row i applies the window to pixels i .. i + win - 1."""
    out = size - len(window) + 1
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        m[i, i:i + len(window)] = window
    return m


@functools.partial(jax.jit, static_argnums=2)
def ssim(a: jax.Array, b: jax.Array, settings: SSIMSettings = STANDARD) -> jax.Array:
    """Per-image SSIM (B,) of two (B, H, W, C) float batches on the scale ``settings.data_range``
    refers to."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"ssim needs two (B, H, W, C) batches of one shape, got {a.shape} and {b.shape}"
        )
    _, h, w, _ = a.shape
    if min(h, w) < settings.win_size:
        raise ValueError(
            f"images of {h}x{w} are smaller than the SSIM window ({settings.win_size})"
        )
    window = _window(settings)
    rows = jnp.asarray(_valid_filter_matrix(h, window))
    cols = jnp.asarray(_valid_filter_matrix(w, window))
    hp = jax.lax.Precision.HIGHEST

    def local_mean(x):
        return jnp.einsum(
            "pw,bowc->bopc", cols, jnp.einsum("oh,bhwc->bowc", rows, x, precision=hp), precision=hp
        )

    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    n = settings.win_size ** 2
    cov_norm = n / (n - 1) if settings.sample_covariance else 1.0
    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = cov_norm * (local_mean(a * a) - mu_a * mu_a)
    var_b = cov_norm * (local_mean(b * b) - mu_b * mu_b)
    cov = cov_norm * (local_mean(a * b) - mu_a * mu_b)
    c1 = (settings.k1 * settings.data_range) ** 2
    c2 = (settings.k2 * settings.data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return jnp.mean(ssim_map, axis=(1, 2, 3))
