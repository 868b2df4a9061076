"""Alignment loss (official ``global_token_learning``): SigLIP2 conversion against a NumPy
re-computation of the HF vision tower, the double post-LayerNorm, conversion errors, the so400m
parameter count, and the loss inside the tokenizer step."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tokenizer_fashion_mnist
from detailflow_jax import sharding
from detailflow_jax.convert import siglip2
from detailflow_jax.convert.state_dict import ConversionError
from detailflow_jax.losses.alignment import (
    GlobalTokenProjection,
    SiglipVisionTower,
    alignment_loss,
    init_projection,
    siglip_target,
    tower_for,
)
from detailflow_jax.losses.weights import MissingWeightsError
from detailflow_jax.tokenizer.degradation import degradation_matrix
from detailflow_jax.train.tokenizer_step import FrozenNets, load_frozen, make_tokenizer_step

WIDTH, DEPTH, HEADS, MLP, PATCH, POS_GRID = 32, 2, 2, 64, 16, 2  # 32-px images: a 2x2 patch grid
IMAGE = PATCH * POS_GRID


def hf_state_dict(seed=0, prefix="vision_model.", depth=DEPTH):
    """A random HF-Siglip2Model-style state dict (tiny sizes) with text and pooling-head keys to be
    skipped."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)
    sd = {
        "embeddings.patch_embedding.weight": r(WIDTH, 3 * PATCH * PATCH),
        "embeddings.patch_embedding.bias": r(WIDTH),
        "embeddings.position_embedding.weight": r(POS_GRID**2, WIDTH),
        "post_layernorm.weight": 1 + r(WIDTH),
        "post_layernorm.bias": r(WIDTH),
    }
    for i in range(depth):
        layer = f"encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            sd[f"{layer}{ln}.weight"], sd[f"{layer}{ln}.bias"] = 1 + r(WIDTH), r(WIDTH)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{layer}self_attn.{proj}.weight"], sd[f"{layer}self_attn.{proj}.bias"] = (
                r(WIDTH, WIDTH),
                r(WIDTH),
            )
        sd[f"{layer}mlp.fc1.weight"], sd[f"{layer}mlp.fc1.bias"] = r(MLP, WIDTH), r(MLP)
        sd[f"{layer}mlp.fc2.weight"], sd[f"{layer}mlp.fc2.bias"] = r(WIDTH, MLP), r(WIDTH)
    sd = {prefix + k: v for k, v in sd.items()}
    if prefix == "vision_model.":
        sd.update(
            {
                "vision_model.head.probe": r(1, 1, WIDTH),
                "vision_model.head.attention.in_proj_weight": r(3 * WIDTH, WIDTH),
                "text_model.embeddings.token_embedding.weight": r(10, WIDTH),
                "logit_scale": r(1),
                "logit_bias": r(1),
            }
        )
    return sd


def numpy_siglip_target(sd, images, heads=HEADS, prefix="vision_model.", post_norms=2):
    """HF Siglip2VisionTransformer written out in NumPy from the torch-layout weights, then the
    official forward_features (post_layernorm again), mean over patches, l2-normalised."""
    w = lambda k: sd[prefix + k].astype(np.float64)
    linear = lambda x, k: x @ w(k + ".weight").T + w(k + ".bias")

    def ln(x, k):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * w(k + ".weight") + w(k + ".bias")

    b, s = images.shape[0], images.shape[1] // PATCH
    x = np.asarray(images, np.float64).reshape(b, s, PATCH, s, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    h = linear(x.reshape(b, s * s, -1), "embeddings.patch_embedding") + w(
        "embeddings.position_embedding.weight"
    )
    d = WIDTH // heads
    for i in range(DEPTH):
        layer = f"encoder.layers.{i}."
        a = ln(h, layer + "layer_norm1")
        q, k, v = (linear(a, layer + f"self_attn.{n}_proj").reshape(b, -1, heads, d) for n in "qkv")
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        h = h + linear(
            np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, -1, WIDTH), layer + "self_attn.out_proj"
        )
        m = linear(ln(h, layer + "layer_norm2"), layer + "mlp.fc1")
        m = 0.5 * m * (1 + np.tanh(np.sqrt(2 / np.pi) * (m + 0.044715 * m ** 3)))
        h = h + linear(m, layer + "mlp.fc2")
    for _ in range(post_norms):
        h = ln(h, "post_layernorm")
    pooled = h.mean(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)


def test_converted_tower_equals_numpy_reference_with_double_post_layernorm(images):
    sd = hf_state_dict()
    tree, skipped = siglip2.convert_siglip2(sd, heads=HEADS)
    assert set(skipped) == {
        "vision_model.head.probe",
        "vision_model.head.attention.in_proj_weight",
        "text_model.embeddings.token_embedding.weight",
        "logit_scale",
        "logit_bias",
    }
    tower = tower_for(tree["tower"], int(tree["num_heads"]))
    assert (
        tower.width,
        tower.depth,
        tower.heads,
        tower.mlp_dim,
        tower.patch_size,
        tower.pos_grid,
    ) == (WIDTH, DEPTH, HEADS, MLP, PATCH, POS_GRID)
    got = np.asarray(tower.apply({"params": tree["tower"]}, jnp.asarray(images)))
    np.testing.assert_allclose(got, numpy_siglip_target(sd, images), atol=2e-5)
    # The test can tell the official LN(LN(h)) from a single post-LN.
    assert np.abs(got - numpy_siglip_target(sd, images, post_norms=1)).max() > 1e-2


def test_tokenizer_checkpoint_repa_copy_converts_like_the_hf_file():
    hf, _ = siglip2.convert_siglip2(hf_state_dict(), heads=HEADS)
    official = hf_state_dict(prefix="repa_model.visual_model.")
    official.update({"encoder.latent_tokens": np.zeros((1, 4, WIDTH), np.float32),
                     "global_token_proj.0.weight": np.zeros((1024, 8), np.float32)})
    for prefix in (None, "repa_model."):
        tree, skipped = siglip2.convert_siglip2(official, heads=HEADS, prefix=prefix)
        assert skipped == ["encoder.latent_tokens", "global_token_proj.0.weight"]
        jax.tree.map(np.testing.assert_array_equal, tree["tower"], hf["tower"])
    # --layers keeps the first L layers and reports the rest as skipped.
    tree, skipped = siglip2.convert_siglip2(hf_state_dict(), layers=1, heads=HEADS)
    assert list(tree["tower"]["layers"]) == ["layers_0"]
    assert sum(k.startswith("vision_model.encoder.layers.1.") for k in skipped) == 16


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda sd: sd.pop("vision_model.post_layernorm.bias"),
            "missing keys.*vision_model.post_layernorm.bias",
        ),
        (
            lambda sd: sd.update(
                {"vision_model.encoder.layers.1.self_attn.q_proj.weight": np.zeros((WIDTH, 8))}
            ),
            r"vision_model.encoder.layers.1.self_attn.q_proj.weight: checkpoint \(32, 8\) vs model "
            r"\(32, 32\)",
        ),
        (
            lambda sd: sd.update({"vision_model.encoder.layers.0.extra.weight": np.zeros(3)}),
            "unexpected keys.*vision_model.encoder.layers.0.extra.weight",
        ),
        (
            lambda sd: sd.pop("vision_model.embeddings.position_embedding.weight"),
            "no SigLIP2 vision tower",
        ),
    ],
)
def test_conversion_errors_name_the_key(edit, message):
    sd = hf_state_dict()
    edit(sd)
    with pytest.raises(ConversionError, match=message):
        siglip2.convert_siglip2(sd, heads=HEADS)


def test_so400m_tower_and_projection_parameter_counts():
    width, depth, mlp, patch_dim, positions = 1152, 27, 4304, 3 * 16 * 16, 256
    block = (
        2 * 2 * width + 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width)
    )
    expected = (patch_dim * width + width) + positions * width + depth * block + 2 * width
    assert expected == 412_649_712
    shapes = jax.eval_shape(SiglipVisionTower().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == expected
    proj = jax.eval_shape(lambda k: init_projection(k, 8, 1152), jax.random.key(0))
    expected_proj = (8 + 1) * 1024 + (1024 + 1) * 1024 + (1024 + 1) * 1152
    # 2.24M, docs/model.md
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(proj)) == expected_proj == 2_239_616


def test_alignment_loss_is_minus_mean_cosine():
    proj = jax.tree.map(np.asarray, nn.unbox(init_projection(jax.random.key(0), 8, WIDTH)))
    tokens = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    target = np.random.default_rng(3).standard_normal((3, WIDTH))
    target /= np.linalg.norm(target, axis=-1, keepdims=True)
    silu = lambda x: x / (1 + np.exp(-x))
    h = silu(tokens @ proj["fc1"]["kernel"] + proj["fc1"]["bias"])
    h = silu(h @ proj["fc2"]["kernel"] + proj["fc2"]["bias"])
    h = h @ proj["fc3"]["kernel"] + proj["fc3"]["bias"]
    cos = np.sum(h * target, axis=-1) / np.linalg.norm(h, axis=-1)
    np.testing.assert_allclose(
        float(alignment_loss(proj, jnp.asarray(tokens), jnp.asarray(target))),
        -cos.mean(),
        rtol=1e-5,
    )
    bound = 8 ** -0.5  # torch nn.Linear default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert (
        np.abs(proj["fc1"]["kernel"]).max() <= bound and np.abs(proj["fc1"]["bias"]).max() <= bound
    )
    assert GlobalTokenProjection().hidden == 1024


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A tiny tower written by the command-line converter (as a user would)."""
    root = tmp_path_factory.mktemp("siglip")
    np.savez(root / "model.npz", **hf_state_dict())
    siglip2.main(
        [
            "--checkpoint",
            str(root / "model.npz"),
            "--out",
            str(root / "converted"),
            "--heads",
            str(HEADS),
        ]
    )
    return str(root / "converted")


def align_config(siglip_weights):
    config = tokenizer_fashion_mnist.get_config("smoke")
    config.degradation_prob = 0.0
    config.model.update(patch_size=8, pos_grid=4)
    config.optim.update(warmup_steps=0, lr=3e-3, min_lr_ratio=1.0)
    config.losses.update(align_weight=1.0, siglip_weights=siglip_weights)
    return config


def test_tokenizer_step_trains_the_alignment_loss(siglip_dir):
    config = align_config(siglip_dir)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    frozen = load_frozen(config)
    program = make_tokenizer_step(config, mesh, frozen)
    state = program.init(0)
    assert set(state["align_proj"]) == {"fc1", "fc2", "fc3"} and "tokenizer" not in state["params"]
    assert jax.tree.structure(program.abstract_state) == jax.tree.structure(state)

    tables = program.tables
    t = tables.num_tokens
    fn = program.steps[tables.canvas[t]]
    batch = jnp.asarray(
        np.random.default_rng(4).uniform(-1, 1, (config.batch_size, IMAGE, IMAGE, 3)), jnp.float32
    )
    batch = jax.device_put(batch, sharding.batch_sharding(mesh, 4))
    matrix = jnp.asarray(degradation_matrix(t, tables))
    proj0 = jax.device_get(state["align_proj"])
    losses = []
    for _ in range(8):
        state, metrics = fn(
            state, frozen.params, batch, np.int32(t), matrix, np.int32(1), np.int32(2)
        )
        losses.append(float(metrics["align_loss"]))
    assert all(np.isfinite(losses)) and min(losses) >= -1.0 - 1e-5
    assert losses[-1] < losses[0] - 0.1, losses
    assert not np.allclose(
        jax.device_get(state["align_proj"])["fc3"]["kernel"], proj0["fc3"]["kernel"]
    )
    # The tower the step uses (converted by the CLI, loaded from the directory) is the HF model's.
    np.testing.assert_allclose(siglip_target(frozen.siglip, frozen.params["siglip"], batch),
                               numpy_siglip_target(hf_state_dict(), np.asarray(batch)), atol=2e-5)


def test_missing_siglip_weights_name_the_flag(tmp_path):
    with pytest.raises(MissingWeightsError, match="--config.losses.siglip_weights"):
        load_frozen(align_config(""))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MissingWeightsError, match="convert.siglip2"):
        load_frozen(align_config(str(tmp_path / "model.safetensors")))
    switched_off = align_config("")
    switched_off.losses.align_weight = 0.0
    assert load_frozen(switched_off) == FrozenNets({})
