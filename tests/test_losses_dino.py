"""DINO discriminator: backbone read-outs and eval/train logits against the official DinoDisc;
conversion rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.convert.dino import convert_dino, discriminator_for
from detailflow_jax.convert.state_dict import ConversionError, load_state_dict
from detailflow_jax.losses.dino import X_SCALE, X_SHIFT, dino_preprocess
from detailflow_jax.losses.discriminator import DinoDiscriminator, load_dino_params
from detailflow_jax.losses.weights import MissingWeightsError


def key(seed):
    # RBG keys: XLA:CPU compiles partitionable-threefry random ops ~10x slower, which dominates
    # these tiny tests.
    return jax.random.key(seed, impl="rbg")


def nhwc(a):
    return jnp.asarray(a.transpose(0, 2, 3, 1))


def fp16(values):
    return tuple(float(np.float16(v)) for v in values)


@pytest.fixture(scope="module")
def dino_fixture(large_fixtures):
    folder = large_fixtures / "losses"
    backbone = load_state_dict(folder / "dino_vits16_state_dict_fp16.npz")
    heads = load_state_dict(folder / "dino_disc_heads_state_dict_fp16.npz")
    # The fixture generator rounded every float tensor of the module to float16, including the
    # x_scale / x_shift normalisation buffers (which the real checkpoint does not hold); reproduce
    # that rounding here only.
    disc = discriminator_for(backbone).clone(x_scale=fp16(X_SCALE), x_shift=fp16(X_SHIFT))
    return backbone, convert_dino(backbone, heads), disc, np.load(folder / "dino_disc_io.npz")


def assert_close(got, ref, name):
    np.testing.assert_allclose(
        np.asarray(got), ref, rtol=0, atol=1e-4 * np.abs(ref).max(), err_msg=name
    )


@pytest.mark.parity
def test_dino_readouts_and_logits_match_official(dino_fixture):
    _, tree, disc, io = dino_fixture
    backbone, heads = tree["backbone"], tree["heads"]

    @jax.jit
    def run(x224, x32):
        acts = disc.backbone().apply(
            {"params": backbone}, dino_preprocess(x224, x_scale=disc.x_scale, x_shift=disc.x_shift)
        )
        eval224 = disc.apply(heads, x224, backbone, train=False)
        eval32 = disc.apply(heads, x32, backbone, train=False)  # bicubic 32 -> 224
        train224, new_stats = disc.apply(heads, x224, backbone, train=True, mutable=["batch_stats"])
        return acts, eval224, eval32, train224, new_stats["batch_stats"]

    acts, eval224, eval32, train224, new_stats = run(nhwc(io["x224"]), nhwc(io["x32"]))
    assert len(acts) == 5
    for i, a in enumerate(acts):
        assert_close(np.asarray(a).transpose(0, 2, 1), io[f"dino_act{i}_x224"], f"dino_act{i}")
    assert eval224.shape == (4, 980)
    assert_close(eval224, io["logits_eval_x224"], "logits_eval_x224")
    assert_close(eval32, io["logits_eval_x32"], "logits_eval_x32")
    # batch stats + one power iteration
    assert_close(train224, io["logits_train_x224"], "logits_train_x224")
    # Train mode stores the power-iterated u and moves the BatchNorm running mean.
    old, new = heads["batch_stats"]["head_0"], new_stats["head_0"]
    assert not np.allclose(new["block_conv"]["u"], old["block_conv"]["u"])
    np.testing.assert_allclose(np.linalg.norm(new["block_conv"]["u"]), 1.0, rtol=1e-5)
    assert not np.allclose(new["block_norm"]["mean"], old["block_norm"]["mean"])


def test_conversion_zeroes_the_key_bias_and_splits_qkv(dino_fixture):
    state, tree, _, _ = dino_fixture
    qkv_w, qkv_b = state["blocks.3.attn.qkv.weight"], state["blocks.3.attn.qkv.bias"]
    attn = tree["backbone"]["layers_3"]["self_attn"]
    assert np.abs(qkv_b[384:768]).max() > 0  # the file holds a k bias ...
    np.testing.assert_array_equal(attn["k_proj"]["bias"], 0.0)  # ... which the port drops
    np.testing.assert_array_equal(attn["v_proj"]["bias"], qkv_b[768:].astype(np.float32))
    np.testing.assert_array_equal(attn["q_proj"]["kernel"], qkv_w[:384].T.astype(np.float32))
    assert "norm" not in tree["backbone"]  # the final norm is not used


def test_conversion_errors_name_the_keys(dino_fixture):
    state, _, _, _ = dino_fixture
    with pytest.raises(ConversionError, match="blocks.7.mlp.fc1.weight"):
        convert_dino({k: v for k, v in state.items() if k != "blocks.7.mlp.fc1.weight"})
    with pytest.raises(ConversionError, match="no cls_token"):
        convert_dino({k: v for k, v in state.items() if k != "cls_token"})
    with pytest.raises(ConversionError, match="unexpected keys.*extra"):
        convert_dino(state, {"extra": np.zeros(3)})


def test_preprocess_resizes_crops_and_errors():
    big = jax.random.uniform(key(0), (2, 240, 240, 3), minval=-1, maxval=1)
    area = dino_preprocess(big)  # no key: deterministic area resize
    assert area.shape == (2, 224, 224, 3)
    crop = jax.jit(lambda k: dino_preprocess(big, crop_key=k)[0, 0, :2, 0])
    outs = {tuple(np.asarray(crop(key(s))).round(5)) for s in range(8)}
    assert len(outs) > 2  # crops at several offsets (and the area path) are drawn per call
    normalised = dino_preprocess(jnp.zeros((1, 224, 224, 3)))
    np.testing.assert_allclose(normalised[0, 0, 0], (0.5 - np.array([0.485, 0.456, 0.406])) /
                               np.array([0.229, 0.224, 0.225]), rtol=1e-6)
    with pytest.raises(
        MissingWeightsError,
        match="--config.losses.dino_weights=<dir converted by python -m "
        "detailflow_jax.convert.dino>",
    ):
        load_dino_params("")


def test_tiny_discriminator_trains_heads_only():
    disc = DinoDiscriminator(width=32, heads=2, patch=8, img_size=32, key_depths=(0, 1))
    x = jax.random.uniform(key(1), (2, 32, 32, 3), minval=-1, maxval=1)

    @jax.jit
    def init():
        backbone = disc.backbone().init(key(2), x)["params"]
        return backbone, disc.init(key(3), x, backbone, train=False)

    backbone, variables = init()
    # the frozen backbone is not a variable
    assert set(variables["params"]) == {"head_0", "head_1", "head_2"}

    def d_loss(params, img):
        logits, _ = disc.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            img,
            backbone,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(logits), logits

    (_, logits), (g_params, g_img) = jax.jit(
        jax.value_and_grad(d_loss, argnums=(0, 1), has_aux=True)
    )(variables["params"], x)
    assert logits.shape == (2, 3 * 16)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(g_params))
    # the generator gets gradients through the frozen backbone
    assert np.abs(np.asarray(g_img)).max() > 0


def test_cli_without_heads_writes_the_backbone_only(dino_fixture, large_fixtures, tmp_path):
    from detailflow_jax.convert.dino import main

    _, tree, _, _ = dino_fixture
    main(["--backbone", str(large_fixtures / "losses" / "dino_vits16_state_dict_fp16.npz"), "--out",
          str(tmp_path / "dino")])
    backbone, heads = load_dino_params(tmp_path / "dino")
    assert heads is None
    jax.tree.map(np.testing.assert_array_equal, backbone, tree["backbone"])
