"""The KV-cache sampler against the reference sampler, logit filters, CFG paths, sampling
statistics, tracing and sharding. Tiny random models with perturbed weights (the zero-initialised
output layer would give uniform logits)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from detailflow_jax import sharding as shd
from detailflow_jax.ar.logits import (
    SamplingSettings,
    first_argmax,
    select_tokens,
    top_k_top_p_filter,
)
from detailflow_jax.ar.model import GPT, GPTConfig, init_params, stack_layers
from detailflow_jax.ar.reference import ReferenceSampler
from detailflow_jax.ar.sampling import Sampler, default_cache_chunks
from detailflow_jax.config_lib import ConfigError
from test_gpt_model import TINY



def random_model(seed=0, noise=0.3, **sizes):
    """GPT with N(0, noise) added to every initialised parameter (so logits are far from
    uniform)."""
    base = TINY
    cfg = GPTConfig(**{**base, **sizes}).validate()
    model = GPT(cfg)
    params = nn.unbox(init_params(model, jax.random.key(seed)))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = tree.unflatten(
        [x + noise * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    return model, params


@pytest.fixture(scope="module")
def small():
    # causal_num = 2 g: a token-causal prefix longer than one group.
    return random_model(num_tokens=16, group_size=2, causal_num=4)


@pytest.fixture(scope="module")
def small_samplers(small):
    model, _ = small
    return Sampler(model), ReferenceSampler(model, fixed_length=True)


LABELS = np.array([0, 3, 4, 1])


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings.create(
            cfg_scale=1.8, cfg_schedule="gradual", top_k=12, top_p=0.9, temperature=0.8
        ),
        SamplingSettings.create(),  # no CFG: a B batch, no doubling
    ],
    ids=["cfg-gradual-topk-topp", "no-cfg"],
)
def test_cached_equals_reference_random_sampling(small, small_samplers, settings):
    model, params = small
    cached, reference = small_samplers
    key = jax.random.key(7)
    a = np.asarray(cached(params, LABELS, key, settings))
    b = np.asarray(reference(params, LABELS, key, settings))
    assert a.shape == (len(LABELS), model.cfg.num_tokens)
    np.testing.assert_array_equal(a, b)
    # Random sampling really happened: another key gives other tokens.
    assert (np.asarray(cached(params, LABELS, jax.random.key(8), settings)) != a).any()


def test_per_length_reference_equals_fixed_length():
    model, params = random_model(num_tokens=8, group_size=2, causal_num=2, n_layer=1)
    settings = SamplingSettings.create(cfg_scale=2.0)
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        np.asarray(ReferenceSampler(model)(params, LABELS, key, settings)),
        np.asarray(ReferenceSampler(model, fixed_length=True)(params, LABELS, key, settings)),
    )


def test_cfg_interval_switches_guidance_off(small, small_samplers):
    model, params = small
    cached, reference = small_samplers
    key = jax.random.key(1)
    guided = SamplingSettings.create(cfg_scale=3.0, greedy=True)
    # guidance only at steps 0 and 1
    cut = SamplingSettings.create(cfg_scale=3.0, greedy=True, cfg_interval=0)
    a, b = (
        np.asarray(cached(params, LABELS, key, cut)),
        np.asarray(reference(params, LABELS, key, cut)),
    )
    np.testing.assert_array_equal(a, b)
    full = np.asarray(cached(params, LABELS, key, guided))
    np.testing.assert_array_equal(a[:, :2], full[:, :2])
    assert (a != full).any()


def test_cfg_scale_one_equals_conditional_sampling(small, small_samplers):
    _, params = small
    cached, _ = small_samplers
    key = jax.random.key(5)
    # the doubled [cond; null] batch with s = 1
    forced = SamplingSettings(cfg_scale=1.0, guidance=True)
    plain = SamplingSettings.create(cfg_scale=1.0)
    assert not plain.guidance
    np.testing.assert_array_equal(np.asarray(cached(params, LABELS, key, forced)),
                                  np.asarray(cached(params, LABELS, key, plain)))


def test_compiles_once_across_calls(small):
    model, params = small
    sampler = Sampler(model)
    settings = SamplingSettings.create(cfg_scale=1.5, top_k=8)
    outs = []
    for i, scale in enumerate([1.5, 2.5, 4.0]):  # cfg_scale and temperature are traced, not static
        s = SamplingSettings.create(cfg_scale=scale, top_k=8, temperature=1.0 + i / 4)
        outs.append(np.asarray(sampler(params, (LABELS + i) % 5, jax.random.key(i), s)))
    sampler(params, LABELS, jax.random.key(0), settings)
    assert sampler.num_traces == 1
    assert len({o.tobytes() for o in outs}) == 3


@pytest.mark.parametrize("sizes,chunks", [
    (dict(num_tokens=16, group_size=2, causal_num=4), 4),   # causal steps in chunk 0, groups over
                                                            # chunks 0..3
    (dict(num_tokens=16, group_size=2, causal_num=8), 4),   # the token-causal prefix spans two
                                                            # chunks
    (dict(num_tokens=24, group_size=4, causal_num=4), 3),
], ids=["C-in-first-chunk", "C-spans-chunks", "three-chunks"])
def test_chunked_cache_gives_the_same_tokens(sizes, chunks):
    """Attending to the visible chunks only is exact: same tokens as one chunk and as the reference
    sampler."""
    model, params = random_model(seed=5, **sizes)
    settings = SamplingSettings.create(cfg_scale=2.0, top_k=10)
    key = jax.random.key(3)
    chunked = Sampler(model, cache_chunks=chunks)
    out = np.asarray(chunked(params, LABELS, key, settings))
    np.testing.assert_array_equal(
        out, np.asarray(Sampler(model, cache_chunks=1)(params, LABELS, key, settings))
    )
    np.testing.assert_array_equal(
        out, np.asarray(ReferenceSampler(model, fixed_length=True)(params, LABELS, key, settings))
    )
    assert chunked.num_traces == 1


def test_chunk_count_default_and_validation():
    chunks = lambda n, g=8: default_cache_chunks(
        GPTConfig(num_tokens=n, group_size=g, causal_num=g)
    )  # noqa: E731
    assert [chunks(128), chunks(256), chunks(512), chunks(1024), chunks(2048), chunks(256, 16)] == [
        1,
        2,
        4,
        8,
        8,
        2,
    ]
    assert chunks(384) == 3 and chunks(200) == 1  # 200 has no split into multiples of 8 of >= 128
    model, _ = random_model(num_tokens=16, group_size=4, causal_num=4)
    for bad in (3, 8, 0):  # 16 / 3 is not whole; 16 / 8 = 2 is not a multiple of g = 4
        with pytest.raises(ConfigError, match="num_chunks"):
            Sampler(model, cache_chunks=bad)


def test_scan_layers_model_samples_like_the_unrolled_model(small):
    """A scan_layers checkpoint (stacked weights) goes through the sampler's unrolled decoder
    unchanged."""
    model, params = small
    stacked = stack_layers(params, model.cfg.n_layer)
    scan_model = GPT(dataclasses.replace(model.cfg, scan_layers=True))
    settings = SamplingSettings.create(cfg_scale=1.5)
    key = jax.random.key(9)
    np.testing.assert_array_equal(np.asarray(Sampler(scan_model)(stacked, LABELS, key, settings)),
                                  np.asarray(Sampler(model)(params, LABELS, key, settings)))


def test_sampling_draws_what_jax_categorical_draws():
    """select_tokens keeps jax.random.categorical's Gumbel-max draw exactly (only its argmax is
    faster), and first_argmax is jnp.argmax, ties included."""
    logits = jax.random.normal(jax.random.key(0), (3, 4, 50)) * 3
    key, step = jax.random.key(4), 6
    settings = SamplingSettings.create(temperature=0.5)
    ours = select_tokens(logits, step, key, settings, num_groups=4, group_size=4, causal_num=4)
    theirs = jax.random.categorical(jax.random.fold_in(key, step), logits / 0.5, axis=-1)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    ties = jnp.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-jnp.inf, 0.0, -1.0, 0.0]])
    np.testing.assert_array_equal(
        np.asarray(first_argmax(ties)), np.asarray(jnp.argmax(ties, axis=-1))
    )
    assert first_argmax(ties).dtype == jnp.int32


def test_steps_and_prefix_shapes():
    for (n, g, c), steps in {(128, 8, 8): 23, (256, 8, 8): 39, (512, 8, 8): 71, (256, 16, 16): 31,
                             (128, 8, 16): 30}.items():
        assert GPTConfig(num_tokens=n, group_size=g, causal_num=c).num_steps == steps


def test_sharded_sampler_matches_single_device(small):
    model, params = small
    settings = SamplingSettings.create(cfg_scale=2.0)
    key = jax.random.key(11)
    labels = np.arange(8) % 5
    mesh = shd.make_mesh((4, 2, 1))
    sharded = Sampler(model, mesh=mesh, cache_chunks=2)  # the constraint covers every chunk
    out = sharded(params, labels, key, settings)
    assert out.sharding.spec[0] == shd.BATCH_AXES
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(Sampler(model)(params, labels, key, settings))
    )
    with pytest.raises(ValueError, match="not divisible"):
        sharded(params, labels[:6], key, settings)


# ---- logit filters -------------------------------------------------------------------------------

def test_top_k_keeps_exactly_the_k_largest():
    logits = jnp.array([[0.1, 2.0, -1.0, 3.0, 0.5, 2.5], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    out = np.asarray(top_k_top_p_filter(logits, top_k=3))
    np.testing.assert_array_equal(np.isfinite(out), [[0, 1, 0, 1, 0, 1], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(out[np.isfinite(out)], np.asarray(logits)[np.isfinite(out)])
    # Ties at the k-th value survive (HF semantics: remove only logits < the k-th largest).
    tie = np.asarray(top_k_top_p_filter(jnp.array([[1.0, 2.0, 2.0, 0.0]]), top_k=2))
    np.testing.assert_array_equal(np.isfinite(tie), [[0, 1, 1, 0]])
    assert np.isfinite(np.asarray(top_k_top_p_filter(logits, top_k=0))).all()


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])  # sorted: 0.4, 0.3, 0.15, 0.1, 0.05
    logits = jnp.log(jnp.asarray(probs))[None]
    keep = lambda p: np.isfinite(np.asarray(top_k_top_p_filter(logits, top_p=p)))[0]  # noqa: E731
    np.testing.assert_array_equal(keep(0.3), [0, 1, 0, 0, 0])      # the top token always stays
    np.testing.assert_array_equal(keep(0.5), [0, 1, 0, 1, 0])      # 0.4 < 0.5, crossing token 0.3
                                                                   # kept
    np.testing.assert_array_equal(keep(0.72), [0, 1, 0, 1, 1])     # 0.7 < 0.72 -> add 0.15
    np.testing.assert_array_equal(keep(0.999), [1, 1, 1, 1, 1])
    # top-k first, then top-p renormalised over the survivors (0.4 / 0.7 > 0.5 -> only the top
    # token).
    both = np.isfinite(np.asarray(top_k_top_p_filter(logits, top_k=2, top_p=0.5)))[0]
    np.testing.assert_array_equal(both, [0, 1, 0, 0, 0])


# ---- sampling statistics -------------------------------------------------------------------------

def chi2_upper_quantile(df: int, z: float = 5.0) -> float:
    """Wilson–Hilferty: the chi-square(df) value exceeded with probability ~ Phi(-z) (z = 5: about
    3e-7)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


@pytest.mark.parametrize("top_k", [0, 5])
def test_sampled_frequencies_match_softmax(top_k):
    """First-token frequencies over many samples vs the model's (filtered, temperature-scaled)
    softmax.

    Pearson chi-square against the exact probabilities, rejected above the 1 - 3e-7 quantile (about
    61 for 15 degrees of freedom, 38 for 4): a correct sampler fails with probability ~3e-7, while a
    15% relative error in any token of probability >= 0.1 alone adds n * p * 0.0225 >= 90 at n =
    40,000.
    """
    model, params = random_model(
        seed=3,
        noise=0.5,
        num_tokens=4,
        group_size=2,
        causal_num=2,
        vocab_size=16,
        dim=16,
        n_layer=1,
    )
    n, label, temperature = 40_000, 2, 0.7
    settings = SamplingSettings.create(temperature=temperature, top_k=top_k)
    tokens = np.asarray(Sampler(model)(params, np.full((n,), label), jax.random.key(123), settings))
    logits = (
        model.apply({"params": params}, jnp.zeros((1, 0), jnp.int32), jnp.array([label]))[0, 0]
        / temperature
    )
    probs = np.asarray(jax.nn.softmax(top_k_top_p_filter(logits, top_k=top_k)), np.float64)
    counts = np.bincount(tokens[:, 0], minlength=model.cfg.vocab_size)
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token that top-k removed"
    expected = n * probs[support]
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < chi2_upper_quantile(int(support.sum()) - 1), (chi2, counts, expected)
