"""The host-side draws of t and of the self-correction span follow the official distributions."""

import collections
import json

import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.tokenizer.degradation import (
    degradation_matrix,
    degrade,
    sample_noise_span,
    sample_token_count,
)
from detailflow_jax.tokenizer.resolution import ResolutionTables, admissible_token_counts


def test_token_count_distribution():
    rng = np.random.default_rng(0)
    n, g, c, p = 128, 8, 8, 0.2
    draws = [sample_token_count(rng, n, g, c, p) for _ in range(40_000)]
    counts = collections.Counter(draws)
    assert set(counts) <= set(admissible_token_counts(n, g, c))
    assert n - g not in counts or counts[n - g] > 0
    # P(t = N) = 0.8; P(t = 3) = 0.2/120; P(t = 16) = 0.2*8/120. Bounds are > 6 standard deviations
    # wide.
    assert abs(counts[n] / len(draws) - 0.8) < 0.013
    assert abs(counts[16] / len(draws) - 0.2 * 8 / 120) < 0.008
    assert abs(counts[3] / len(draws) - 0.2 / 120) < 0.0015


def test_noise_span_rules():
    rng = np.random.default_rng(1)
    g, c = 8, 8
    assert sample_noise_span(rng, 1, g, c) is None
    for _ in range(2000):
        t = int(rng.choice([2, 5, 8, 16, 64, 128]))
        idx, end = sample_noise_span(rng, t, g, c)
        if t <= c:
            assert 0 <= idx < t and end == idx + 1
        elif idx < c:
            assert end == idx + 1
        else:
            # never the last group the decoder sees
            assert idx % g == 0 and end == idx + g and end <= t - g


@pytest.mark.parity
def test_degradation_matrices_reproduce_official_targets(parity_folder):
    cfg = json.loads((parity_folder / "config.json").read_text())
    io = np.load(parity_folder / "degradation_io.npz")
    to_nhwc = lambda x: np.transpose(x, (0, 2, 3, 1))
    tables = ResolutionTables(
        cfg["image_size"], cfg["num_latent_tokens"], cfg["group_size"], cfg["causal_num"]
    )
    images = jnp.asarray(to_nhwc(io["image"]))
    for t in tables.token_counts:
        got = degrade(images, jnp.asarray(degradation_matrix(t, tables)))
        np.testing.assert_allclose(got, to_nhwc(io[f"target_t{t}"]), atol=1e-5, err_msg=f"t={t}")
    released = ResolutionTables(256, 128, 8, 8)
    image_256 = jnp.asarray(to_nhwc(io["image_256"]))
    for key in (k for k in io.files if k.startswith("target256_N128_t")):
        t = int(key.rsplit("t", 1)[1])
        got = degrade(image_256, jnp.asarray(degradation_matrix(t, released)))
        np.testing.assert_allclose(got, to_nhwc(io[key]), atol=1e-5, err_msg=key)
