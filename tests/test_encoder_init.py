"""The tokenizer encoder starts from a pretrained SigLIP2 tower (official encoder_pretrained): the
tower's parts land in the encoder, the encoder computes the tower's first layers, the latent
queries stay random, a tower of other sizes or a missing directory is a one-line error naming the
flag, and a resumed run keeps its checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tokenizer_fashion_mnist, tokenizer_imagenet
from detailflow_jax import config_lib, sharding
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.convert import siglip2
from detailflow_jax.losses.alignment import tower_for
from detailflow_jax.losses.weights import MissingWeightsError
from detailflow_jax.nn.vit import ViTStack, layer_norm
from detailflow_jax.params_io import restore_params
from detailflow_jax.tokenizer.encoder import Encoder
from detailflow_jax.train import encoder_init
from detailflow_jax.train import tokenizer as tokenizer_train
from detailflow_jax.train.tokenizer_step import load_frozen, make_tokenizer_step
from test_alignment import HEADS, PATCH, POS_GRID, hf_state_dict

TOWER_DEPTH = 2  # the encoder below takes the first of them


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    """A tiny 2-layer tower written by the command-line converter, as a user would."""
    root = tmp_path_factory.mktemp("siglip")
    np.savez(root / "model.npz", **hf_state_dict(depth=TOWER_DEPTH))
    siglip2.main(["--checkpoint", str(root / "model.npz"), "--out", str(root / "tower"),
                  "--heads", str(HEADS)])
    return str(root / "tower")


def encoder_config(weights, image_size=32, **overrides):
    """The smoke tokenizer (encoder width 32, 1 layer, 2 heads, MLP 64) on the tower's patch 16 and
    2x2 position table; ``weights`` "" starts the encoder random."""
    config = tokenizer_fashion_mnist.get_config("smoke")
    config.degradation_prob = 0.0
    config.model.update(patch_size=PATCH, pos_grid=POS_GRID, image_size=image_size)
    config.data.image_size = image_size
    config.eval_images = 8
    config.update(encoder_pretrained=bool(weights), encoder_weights=weights)
    return config_lib.override(config, **overrides)


def _init(config):
    program = make_tokenizer_step(
        config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]), load_frozen(config)
    )
    return program, jax.device_get(program.init(0)["params"])


def _first_call(module, params, images, name):
    """The output of submodule ``name`` (its first call) inside ``module.apply``."""
    _, inter = module.apply({"params": params}, images, capture_intermediates=True)
    return np.asarray(inter["intermediates"][name]["__call__"][0])


def test_encoder_holds_and_computes_the_towers_first_layers(tower_dir):
    # 64-px images: a 4x4 patch grid, so both networks resize the 2x2 table (bilinear, antialias).
    trainer, params = _init(encoder_config(tower_dir, image_size=64))
    _, random = _init(encoder_config("", image_size=64))
    tower = jax.device_get(restore_params(tower_dir)["tower"])
    enc = params["encoder"]
    assert list(enc["layers"]) == ["layers_0"]
    for key in ("patch_embedding", "position_embedding", "post_layernorm"):
        jax.tree.map(np.testing.assert_array_equal, enc[key], tower[key])
    jax.tree.map(np.testing.assert_array_equal, enc["layers"]["layers_0"],
                 tower["layers"]["layers_0"])
    # Only those change: the latent queries, decoder and quantizer keep the seed's random values.
    for key in ("latent_tokens", "refined_tokens", "latent_pos_embed"):
        np.testing.assert_array_equal(enc[key], random["encoder"][key])
    rest = lambda p: {k: v for k, v in p.items() if k != "encoder"}
    jax.tree.map(np.testing.assert_array_equal, rest(params), rest(random))

    # The patch tokens see only patches, so the encoder's patch stream is the tower run to layer 1.
    # The encoder skips the patch rows of its last block (only the latents are used): run its blocks
    # on its patch embeddings.
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    cfg = trainer.model_cfg
    stack = ViTStack(depth=cfg.encoder.depth, width=cfg.encoder.width, heads=cfg.encoder.heads,
                     mlp_dim=cfg.encoder.mlp_dim, ln_eps=cfg.ln_eps)
    post = layer_norm("post_layernorm", cfg.ln_eps, jnp.float32)
    one_layer = dict(tower, layers={"layers_0": tower["layers"]["layers_0"]})

    def patch_stream(params):
        _, states = Encoder(cfg).apply({"params": params}, images, return_patch_states=True)
        layers = stack.apply({"params": params["layers"]}, states[0])
        return {
            "layers": layers,
            "post_layernorm": post.apply({"params": params["post_layernorm"]}, layers),
        }

    got = patch_stream(enc)
    for name in ("layers", "post_layernorm"):  # the tower applies post_layernorm twice: the first
        want = _first_call(tower_for(one_layer, HEADS), one_layer, images, name)
        # The same float32 arithmetic but for summation order: sums of at most 64 terms, about
        # 64 * 2**-24 = 4e-6 of the largest value.
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    from_random = patch_stream(random["encoder"])["post_layernorm"]
    assert np.abs(got["post_layernorm"] - from_random).max() > 0.1


@pytest.mark.parametrize("overrides, message", [
    ({"model.encoder.mlp_dim": 128},
     r"layers/layers_0/mlp/fc1/kernel: tower \(32, 64\) vs encoder \(32, 128\)"),
    ({"model.encoder.heads": 4}, "heads: 2 in the tower vs model.encoder.heads=4"),
    ({"model.encoder.depth": 3}, "the tower has 2, model.encoder.depth=3"),
    ({"model.pos_grid": 4}, r"position_embedding: tower \(4, 32\) vs encoder \(16, 32\)"),
])
def test_a_tower_of_other_sizes_is_a_one_line_error(tower_dir, overrides, message):
    with pytest.raises(encoder_init.EncoderWeightsMismatch, match=message) as err:
        _init(encoder_config(tower_dir, **overrides))
    assert "--config.encoder_weights" in str(err.value) and "\n" not in str(err.value)


def test_missing_weights_stop_the_run_at_start_up_naming_the_flag(tmp_path):
    with pytest.raises(MissingWeightsError, match="--config.encoder_weights"):
        tokenizer_train.train(encoder_config("", encoder_pretrained=True), str(tmp_path))
    with pytest.raises(MissingWeightsError, match="encoder_weights=.*nowhere does not exist"):
        _init(encoder_config(str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="False: pass --config.encoder_pretrained=True"):
        _init(encoder_config(str(tmp_path), encoder_pretrained=False))


def test_resume_keeps_the_checkpoint_and_does_not_reload(tower_dir, tmp_path, monkeypatch):
    loads = []
    real = encoder_init.load_siglip_tower
    monkeypatch.setattr(encoder_init, "load_siglip_tower",
                        lambda *a, **k: loads.append(a) or real(*a, **k))
    config = encoder_config(tower_dir, total_steps=2, checkpoint_every=100)
    stopped, _ = tokenizer_train.train(config, str(tmp_path), stop_at=1)
    assert len(loads) == 1 and int(stopped["step"]) == 1
    resumed, _ = tokenizer_train.train(config, str(tmp_path))
    assert len(loads) == 1 and int(resumed["step"]) == 2


def test_the_imagenet_recipe_starts_the_encoder_from_siglip2():
    config = tokenizer_imagenet.get_config("DF-16")
    assert config.encoder_pretrained and config.encoder_weights == ""
    with pytest.raises(MissingWeightsError, match="--config.encoder_weights"):
        encoder_init.encoder_weights(config)


def test_the_copy_lands_on_the_sharded_params(tower_dir):
    """On a (2, 2, 2) mesh the copied weights keep the params' shardings and values."""
    config = encoder_config(tower_dir)
    _, single = _init(config)
    program = make_tokenizer_step(
        config, sharding.make_mesh((2, 2, 2), jax.devices()), load_frozen(config)
    )
    state, shardings = program.init(0), program.state_shardings
    fc1 = state["params"]["encoder"]["layers"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert not fc1.sharding.is_fully_replicated  # the check below is about a real split
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
                 state["params"], shardings["params"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), single)
