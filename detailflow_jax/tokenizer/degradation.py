"""Per-step random choices of coarse-to-fine training (official ``ResolutionDegradation``;
docs/model.md#degradation, docs/model.md#self-correction), drawn on the host.

The token count t picks the decoder canvas, which is a static shape, so it is drawn on the host and
selects one of the compiled train steps; the noise position is passed into that step as a traced
integer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np

from detailflow_jax.nn import resample
from detailflow_jax.tokenizer.resolution import ResolutionTables


class NoiseSpan(NamedTuple):
    """Positions [noise_idx, noise_end) are replaced by random top-k codes in the self-correction
    pass."""

    noise_idx: int
    noise_end: int


def sample_token_count(rng: np.random.Generator, num_tokens: int, group_size: int, causal_num: int,
                       degradation_prob: float) -> int:
    """t = N with probability 1 - p; otherwise t ~ U{1..N-g}, rounded up to a whole group past the
    causal prefix."""
    if rng.random() >= degradation_prob:
        return num_tokens
    t = int(rng.integers(1, num_tokens - group_size + 1))
    if t > causal_num:
        t = math.ceil(t / group_size) * group_size
    return t


def sample_noise_span(
    rng: np.random.Generator, t: int, group_size: int, causal_num: int
) -> NoiseSpan | None:
    """The official ``get_noise_token_idx``: one token inside the causal prefix, else one whole
    group that is never the last group the decoder sees. None for t = 1 (nothing to perturb)."""
    if t <= 1:
        return None
    if t <= causal_num:
        noise_idx = int(rng.integers(0, t))
    else:
        u = int(rng.integers(0, t - group_size))
        noise_idx = u if u < causal_num else (u // group_size) * group_size
    return noise_span_at(noise_idx, group_size, causal_num)


def noise_span_at(noise_idx: int, group_size: int, causal_num: int) -> NoiseSpan:
    """The window the official ``encode_image`` perturbs from ``noise_idx``: one token inside the
    causal prefix, else a whole group."""
    return NoiseSpan(noise_idx, noise_idx + (1 if noise_idx < causal_num else group_size))


def degradation_matrix(t: int, tables: ResolutionTables) -> np.ndarray:
    """(canvas[t], R) weights of the official target: area down-sampling to R(t), then bicubic up to
    the canvas.

    Both steps are linear along each axis, so their product is one static matrix per t; all t that
    share a canvas share its shape, which keeps one compiled train step per canvas.
    """
    s, c = tables.content_res[t], tables.canvas[t]
    return (resample.bicubic_matrix(s, c).astype(np.float64) @
            resample.area_matrix(tables.image_size, s).astype(np.float64)).astype(np.float32)


def degrade(images: jax.Array, matrix: jax.Array) -> jax.Array:
    """Applies a ``degradation_matrix`` to both spatial axes of an NHWC batch."""
    return resample.apply_separable(images, matrix, matrix)
