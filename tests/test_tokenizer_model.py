"""Training forward of the tokenizer: self-correction sampling, loss weighting and gradient routing
(docs/model.md#self-correction)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from detailflow_jax.config_lib import ConfigError
from detailflow_jax.convert.state_dict import load_state_dict
from detailflow_jax.convert.tokenizer import convert_tokenizer_state_dict
from detailflow_jax.tokenizer.config import from_fixture_config, validate
from detailflow_jax.tokenizer.model import DetailFlowTokenizer
from detailflow_jax.tokenizer.quantizer import entropy_loss


@pytest.fixture(scope="module")
def setup(repo_fixtures):
    """Official-fixture weights (non-trivial everywhere) and images; no random init needed."""
    folder = repo_fixtures / "official_parity" / "tiny_a"
    cfg = from_fixture_config(json.loads((folder / "config.json").read_text()))
    params = convert_tokenizer_state_dict(
        load_state_dict(folder / "tokenizer_state_dict.npz"), cfg
    ).params
    images = jnp.asarray(np.load(folder / "tokenizer_io.npz")["image"].transpose(0, 2, 3, 1))
    return cfg, DetailFlowTokenizer(cfg), jax.tree.map(jnp.asarray, params), images


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _masked_losses(pre_quant, codes, codebook, start):
    z = _normalize(np.asarray(pre_quant))[:, start:]
    hard = _normalize(np.asarray(codebook))[np.asarray(codes)][:, start:]
    return np.mean((hard - z) ** 2)


def test_forward_losses_and_recon_weights(setup):
    cfg, model, params, images = setup
    n, b, canvas = cfg.num_latent_tokens, images.shape[0], 32
    forward = jax.jit(
        lambda ni, ne, t, train: model.apply(
            {"params": params}, images, t, canvas, ni, ne, jax.random.key(3), train=train
        ),
        static_argnums=3,
    )
    sc = jax.jit(
        lambda ni, ne: model.apply(
            {"params": params},
            images,
            ni,
            ne,
            rng=jax.random.key(3),
            method=DetailFlowTokenizer.self_correct,
        )
    )
    codebook = params["quantizer"]["codebook"]

    # t = 1 convention: noise_idx = -1 -> the corrected half has zero weight; losses are the
    # clean-only ones.
    out = forward(jnp.int32(-1), jnp.int32(1), jnp.int32(1), True)
    assert out["recon"].shape == (2 * b, canvas, canvas, 3)
    np.testing.assert_array_equal(out["recon_weight"], [1.0] * b + [0.0] * b)
    clean = _masked_losses(
        sc(jnp.int32(-1), jnp.int32(1))["pre_quant"], out["indices"][..., 0], codebook, 0
    )
    np.testing.assert_allclose(out["vq_loss"], clean, rtol=1e-5)
    np.testing.assert_allclose(out["commit_loss"], cfg.commit_beta * clean, rtol=1e-5)

    # A perturbed group [8, 12): clean and corrected losses weighted N/(2N-12) and (N-12)/(2N-12).
    out = forward(jnp.int32(8), jnp.int32(12), jnp.int32(16), True)
    ref = sc(jnp.int32(8), jnp.int32(12))
    np.testing.assert_array_equal(out["recon_weight"], [1.0] * (2 * b))
    l_clean = _masked_losses(ref["pre_quant"], ref["clean"], codebook, 0)
    l_sc = _masked_losses(ref["pre_quant_sc"], ref["label"], codebook, 12)
    expected = (n * l_clean + (n - 12) * l_sc) / (2 * n - 12)
    np.testing.assert_allclose(out["vq_loss"], expected, rtol=1e-5)
    idx = np.asarray(out["indices"])
    np.testing.assert_array_equal(idx[:, :12, 2], idx[:, :12, 0])  # label = clean up to noise_end
    np.testing.assert_array_equal(idx[:, :8, 1], idx[:, :8, 0])  # input = clean before noise_idx
    np.testing.assert_array_equal(idx[:, 12:, 1], idx[:, 12:, 2])  # input = label after noise_end
    # The decoded corrected half is the codebook vectors of `input`.
    np.testing.assert_allclose(
        out["quant"][b:], _normalize(np.asarray(codebook))[idx[..., 1]], atol=1e-6
    )

    # Eval: one batch, the corrected sequence (the clean one when noise_idx < 0).
    decode_code = jax.jit(lambda c: model.apply({"params": params}, c, 16, canvas,
                                                method=DetailFlowTokenizer.decode_code))
    out = forward(jnp.int32(8), jnp.int32(12), jnp.int32(16), False)
    np.testing.assert_allclose(out["recon"], decode_code(out["indices"][..., 1]), atol=1e-4)
    out = forward(jnp.int32(-1), jnp.int32(1), jnp.int32(16), False)
    np.testing.assert_allclose(out["recon"], decode_code(out["indices"][..., 0]), atol=1e-4)


def test_sampled_noise_comes_from_top_k(setup):
    cfg, model, params, images = setup
    out = jax.jit(
        lambda key: model.apply(
            {"params": params}, images, 0, 4, rng=key, method=DetailFlowTokenizer.self_correct
        )
    )(jax.random.key(0))
    z = _normalize(np.asarray(out["pre_quant"]))
    book = _normalize(np.asarray(params["quantizer"]["codebook"]))
    nearest = np.argsort(-(z @ book.T), axis=-1)[..., :cfg.noise_top_k]
    noisy = np.asarray(out["input"])[:, :4]
    assert all(noisy[b, i] in nearest[b, i] for b in range(noisy.shape[0]) for i in range(4))
    assert (noisy != np.asarray(out["clean"])[:, :4]).any()


def test_gradient_routing(setup):
    """Straight-through to the encoder, codebook trained by vq_loss, refine path silent when
    noise_idx < 0."""
    cfg, model, params, images = setup

    @jax.jit
    def grads(p, noise_idx, noise_end):
        def loss(p):
            out = model.apply(
                {"params": p}, images, 16, 32, noise_idx, noise_end, jax.random.key(1)
            )
            target = jnp.concatenate([images[:, ::2, ::2]] * 2)
            per_sample = jnp.mean((out["recon"] - target) ** 2, axis=(1, 2, 3))
            w = out["recon_weight"]
            return jnp.sum(w * per_sample) / jnp.sum(w) + out["vq_loss"] + out["commit_loss"]
        return jax.grad(loss)(p)

    def norm(tree):
        return float(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(tree)))

    g = grads(params, jnp.int32(-1), jnp.int32(1))
    assert norm(g["refine_conv"]) == 0.0 and norm(g["encoder"]["refined_tokens"]) == 0.0
    assert norm(g["encoder"]["latent_tokens"]) > 0 and norm(g["quantizer"]) > 0
    assert norm(g["decoder"]) > 0 and norm(g["post_quant_conv"]) > 0
    g = grads(params, jnp.int32(8), jnp.int32(12))
    assert norm(g["refine_conv"]) > 0 and norm(g["encoder"]["refined_tokens"]) > 0


def test_entropy_loss_rewards_confident_and_even_code_use():
    """The official entropy loss: -log K for sure, evenly spread codes; 0 for sure, identical codes;
    masked positions do not count; its weighting in the forward mirrors the vq loss (off at the
    released weight 0)."""
    k, temperature = 4, 0.01
    far, near = 1.0, 0.0
    # token i sure of code i
    even = jnp.full((1, 4, k), far).at[0, jnp.arange(4), jnp.arange(4)].set(near)
    same = jnp.full((1, 4, k), far).at[0, :, 0].set(near)  # every token sure of code 0
    everything = jnp.ones((4,), bool)
    np.testing.assert_allclose(entropy_loss(even, everything, temperature), -np.log(k), atol=1e-3)
    np.testing.assert_allclose(entropy_loss(same, everything, temperature), 0.0, atol=1e-3)
    # Masking tokens 1..3 of `even` leaves a single sure token: no spread, loss 0.
    np.testing.assert_allclose(
        entropy_loss(even, jnp.array([True, False, False, False]), temperature), 0.0, atol=1e-3
    )
    # Uncertain tokens (all codes equally near) pay their own entropy: log K - log K = 0 > -log K.
    assert float(entropy_loss(jnp.zeros((1, 4, k)), everything, temperature)) > -1e-3


def test_entropy_loss_in_the_forward(setup):
    cfg, _, params, images = setup
    on = DetailFlowTokenizer(dataclasses.replace(validate(cfg), entropy_loss_ratio=0.5))
    run = lambda model: jax.jit(
        lambda: model.apply(  # noqa: E731
            {"params": params},
            images,
            jnp.int32(16),
            32,
            jnp.int32(8),
            jnp.int32(12),
            jax.random.key(3),
        )
    )()
    out, off = run(on), run(DetailFlowTokenizer(cfg))
    assert "entropy_loss" not in off
    ref = jax.jit(
        lambda: on.apply(
            {"params": params},
            images,
            jnp.int32(8),
            jnp.int32(12),
            rng=jax.random.key(3),
            method=DetailFlowTokenizer.self_correct,
        )
    )()
    book = _normalize(np.asarray(params["quantizer"]["codebook"]))
    n = cfg.num_latent_tokens

    def distances(pre_quant, start):
        z = _normalize(np.asarray(pre_quant))
        d = (z ** 2).sum(-1, keepdims=True) + (book ** 2).sum(-1) - 2 * z @ book.T
        return jnp.asarray(d), jnp.arange(n) >= start

    # Official compute_entropy_loss(-d) takes every position of both passes (the vq/commit losses of
    # the corrected pass start at noise_end, its entropy does not); then the same N : N - 12
    # weighting.
    expected = 0.5 * (n * entropy_loss(*distances(ref["pre_quant"], 0))
                      + (n - 12) * entropy_loss(*distances(ref["pre_quant_sc"], 0))) / (2 * n - 12)
    np.testing.assert_allclose(out["entropy_loss"], expected, rtol=1e-4)


def test_bf16_distances_reproduce_autocast_assignments():
    """Under bf16 autocast the official distance einsum rounds its inputs and output to bfloat16. On
    a random 8192 x 8 codebook that reassigns a few percent of the tokens against float32; the
    bfloat16 mode reproduces the rounded assignments (an independent float64 computation on
    bfloat16-rounded values), ties aside."""
    import ml_dtypes
    from detailflow_jax.tokenizer.quantizer import VectorQuantizer, l2_normalize as normalize

    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 2048, 8)).astype(np.float32)
    quantizer = {d: VectorQuantizer(8192, 8, distance_dtype=d) for d in ("float32", "bfloat16")}
    variables = nn.unbox(quantizer["float32"].init(jax.random.key(0), z))
    codes = {d: np.asarray(q.apply(variables, z).codes) for d, q in quantizer.items()}

    zn = np.asarray(normalize(jnp.asarray(z)))
    book = np.asarray(normalize(variables["params"]["codebook"]))
    as_bf16 = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float64)  # noqa: E731
    dots = (
        (as_bf16(zn) @ as_bf16(book).T)
        .astype(np.float32)
        .astype(ml_dtypes.bfloat16)
        .astype(np.float32)
    )
    dist = (zn ** 2).sum(-1, keepdims=True) + (book ** 2).sum(-1) - 2 * dots
    expected = dist.argmin(-1)
    best_two = np.sort(dist, axis=-1)[..., :2]
    # not a tie up to float32 rounding of the sum
    clear = best_two[..., 1] - best_two[..., 0] > 1e-5
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(codes["bfloat16"][clear], expected[clear])
    # The case the option exists for: float32 assigns other codes, also where the bf16 distances do
    # not tie.
    assert np.mean(codes["float32"] != codes["bfloat16"]) > 0.01
    assert np.sum(codes["float32"][clear] != expected[clear]) > 0


def test_quantizer_distances_follow_the_compute_dtype_unless_set():
    from configs.tokenizer import get_config
    from detailflow_jax.tokenizer.config import validate
    base = get_config("tiny").model
    assert validate(base).distance_dtype == "float32"
    assert validate(config_override(base, dtype="bfloat16")).distance_dtype == "bfloat16"
    assert (
        validate(
            config_override(base, dtype="bfloat16", quantizer_distances="float32")
        ).distance_dtype
        == "float32"
    )
    with pytest.raises(ConfigError, match="quantizer_distances"):
        validate(config_override(base, quantizer_distances="half"))


def config_override(model, **values):
    model = model.copy_and_resolve_references()
    model.update(values)
    return model
