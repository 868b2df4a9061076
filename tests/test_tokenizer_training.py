"""Tokenizer training: the loss goes down, the sharded step equals the one-device step, resume is
exact, and bad inputs give clear errors."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tokenizer_fashion_mnist
from detailflow_jax import config_lib, optim, sharding
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.losses.weights import MissingWeightsError
from detailflow_jax.tokenizer.degradation import degradation_matrix
from detailflow_jax.tokenizer.resolution import ResolutionTables
from detailflow_jax.train import tokenizer as tokenizer_train
from detailflow_jax.train.tokenizer_step import FrozenNets, make_tokenizer_step
from float_tolerance import assert_same_updates, plain_sgd, reorder_tolerance


def tiny_config(**overrides):
    config = tokenizer_fashion_mnist.get_config("smoke")
    config.degradation_prob = 0.0  # one canvas: one compile
    config.model.patch_size = 8  # canvases 8, 16, 24, 32: few compiles when t varies
    config.model.pos_grid = 4
    config.eval_images = 8
    return config_lib.override(config, **overrides)


def _batch(config, seed=0):
    size = config.model.image_size
    return jax.random.uniform(
        jax.random.key(seed), (config.batch_size, size, size, 3), minval=-1, maxval=1
    )


def _program(config, shape=(1, 1, 1), devices=None):
    """The step of ``config`` (no frozen networks) on a mesh of ``shape`` and its mesh."""
    mesh = sharding.make_mesh(shape, devices or jax.devices()[:1])
    return make_tokenizer_step(config, mesh, FrozenNets({})), mesh


def _run_steps(program, state, images, num_steps, t=None, noise=(1, 2)):
    tables = program.tables
    t = tables.num_tokens if t is None else t
    fn = program.steps[tables.canvas[t]]
    matrix = jnp.asarray(degradation_matrix(t, tables))
    losses = []
    for _ in range(num_steps):
        state, metrics = fn(
            state, {}, images, np.int32(t), matrix, np.int32(noise[0]), np.int32(noise[1])
        )
        losses.append(float(metrics["loss"]))
    return state, losses


def test_a_few_steps_lower_the_loss():
    config = tiny_config(**{"optim.warmup_steps": 0, "optim.lr": 3e-3, "optim.min_lr_ratio": 1.0})
    program, mesh = _program(config)
    images = jax.device_put(_batch(config), sharding.batch_sharding(mesh, 4))
    _, losses = _run_steps(program, program.init(0), images, 12)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_entropy_loss_joins_the_step_loss_when_weighted():
    images = _batch(tiny_config())
    metrics = {}
    for ratio in (0.0, 0.5):
        program, _ = _program(tiny_config(**{"model.entropy_loss_ratio": ratio}))
        tables = program.tables
        fn = program.steps[tables.canvas[tables.num_tokens]]
        _, metrics[ratio] = fn(
            program.init(0),
            {},
            images,
            np.int32(tables.num_tokens),
            jnp.asarray(degradation_matrix(tables.num_tokens, tables)),
            np.int32(1),
            np.int32(2),
        )
    assert "entropy_loss" not in metrics[0.0]
    # Same init and data: the weighted run's loss is the unweighted one plus its entropy term.
    np.testing.assert_allclose(
        metrics[0.5]["loss"], metrics[0.0]["loss"] + metrics[0.5]["entropy_loss"], rtol=1e-5
    )
    assert float(metrics[0.5]["entropy_loss"]) != 0.0


@pytest.mark.parametrize("disc_type", ["none", "patchgan"])
def test_sharded_step_equals_single_device_step(disc_type, monkeypatch):
    """Two steps on a (2, 2, 2) mesh and on one device: the same losses and the same updates, within
    what float32 summation order allows (tests/float_tolerance.py). Plain SGD, so the updates are
    linear in the gradients."""
    monkeypatch.setattr(optim, "adam", plain_sgd())
    config = tiny_config(**{"losses.disc_type": disc_type, "losses.disc_start": 0, "batch_size": 8})
    images = _batch(config)
    results = []
    for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices())):
        program, mesh = _program(config, shape, devices)
        state = program.init(0)
        start = jax.device_get(state)
        sharded_images = jax.device_put(images, sharding.batch_sharding(mesh, 4))
        state, losses = _run_steps(program, state, sharded_images, 2, t=8, noise=(4, 8))
        results.append((start, jax.device_get(state), losses))
    (start_1, single, loss_1), (start_8, multi, loss_8) = results
    # born-sharded init
    jax.tree.map(np.testing.assert_array_equal, start_1["params"], start_8["params"])
    # Every gradient element is a sum over the pixels of the batch the loss averages.
    num_terms = int(np.prod(images.shape))
    np.testing.assert_allclose(loss_1, loss_8, rtol=reorder_tolerance(num_terms, 1.0))
    assert_same_updates(start_1["params"], single["params"], multi["params"], num_terms)
    if disc_type == "patchgan":
        assert_same_updates(start_1["disc"], single["disc"], multi["disc"], num_terms)


def test_resume_after_preemption_equals_uninterrupted_run(tmp_path):
    config = tiny_config(**{"degradation_prob": 0.5, "total_steps": 6, "checkpoint_every": 100})
    uninterrupted, _ = tokenizer_train.train(config, str(tmp_path / "a"))
    stopped, curve = tokenizer_train.train(config, str(tmp_path / "b"), stop_at=3)
    assert curve == {} and int(stopped["step"]) == 3
    resumed, curve = tokenizer_train.train(config, str(tmp_path / "b"))
    assert int(resumed["step"]) == 6 and len(curve) == len(
        ResolutionTables.from_model_config(config.model).canvas
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 jax.device_get(uninterrupted), jax.device_get(resumed))
    assert (tmp_path / "b" / "images" / "coarse_to_fine_6.png").is_file()
    assert (tmp_path / "b" / "reconstruction_psnr.json").is_file()


def test_bad_config_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="batch_size=6"):
        tokenizer_train.train(tiny_config(batch_size=6), str(tmp_path))  # 8 devices do not divide 6
    with pytest.raises(ConfigError, match="data.image_size"):
        tokenizer_train.train(tiny_config(**{"data.image_size": 16}), str(tmp_path))
    with pytest.raises(ConfigError, match="num_latent_tokens"):
        tokenizer_train.train(tiny_config(**{"model.num_latent_tokens": 30}), str(tmp_path))


def test_missing_weights_say_which_file_to_pass(tmp_path):
    with pytest.raises(MissingWeightsError, match="lpips_weights"):
        tokenizer_train.train(tiny_config(**{"losses.lpips_weight": 1.0}), str(tmp_path))
    with pytest.raises(MissingWeightsError, match="dino_weights"):
        tokenizer_train.train(tiny_config(**{"losses.disc_type": "dino"}), str(tmp_path))


def test_missing_fashion_mnist_data_is_a_clear_error(tmp_path):
    config = tiny_config(
        **{
            "data.name": "fashion_mnist",
            "data.data_dir": str(tmp_path / "nowhere"),
            "data.pad_to": 32,
        }
    )
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        tokenizer_train.train(config, str(tmp_path / "w"))


@pytest.mark.parametrize("override, message", [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.batch_size=big", "batch_size"),
])
def test_command_line_rejects_unknown_keys_and_wrong_types(tmp_path, override, message):
    cmd = [
        sys.executable,
        "-m",
        "detailflow_jax.train.tokenizer",
        "--config",
        "configs/tokenizer_fashion_mnist.py:smoke",
        "--workdir",
        str(tmp_path),
        override,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_finetune_decoder_only_moves_only_the_decoder():
    config = tiny_config(**{"optim.warmup_steps": 0, "optim.lr": 3e-3, "optim.min_lr_ratio": 1.0,
                            "finetune_decoder_only": True})
    program, mesh = _program(config)
    state = program.init(0)
    before = jax.tree.map(np.asarray, state["params"])
    images = jax.device_put(_batch(config), sharding.batch_sharding(mesh, 4))
    state, _ = _run_steps(program, state, images, 3)
    after = jax.tree.map(np.asarray, state["params"])
    trained = {"decoder", "post_quant_conv"}
    assert trained < set(before) and {"encoder", "quant_conv", "quantizer", "refine_conv"} <= set(
        before
    )
    for part in before:
        same = jax.tree.leaves(jax.tree.map(np.array_equal, before[part], after[part]))
        if part in trained:
            assert not any(same), f"{part}: some parameters did not move"
        else:
            assert all(same), f"{part}: frozen parameters moved"
    # Adam moments exist for the trained parts only (the frozen ones have no optimiser state, as in
    # PyTorch).
    moments = sum(x.size for x in jax.tree.leaves(state["opt"]) if x.ndim > 0)
    trained_size = sum(x.size for p in trained for x in jax.tree.leaves(before[p]))
    assert moments == 2 * trained_size


def test_finetune_decoder_only_freezes_the_alignment_projection():
    from detailflow_jax.train.tokenizer_step import _is_decoder_param

    tree = {
        "tokenizer": {"decoder": jnp.ones(2), "encoder": jnp.ones(2)},
        "align_proj": {"w": jnp.ones(2)},
    }
    tx = optim.train_only(optax.sgd(1.0), _is_decoder_param)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, tree), tx.init(tree), tree)
    assert float(updates["tokenizer"]["decoder"][0]) == -1.0
    assert (
        float(updates["tokenizer"]["encoder"][0]) == 0.0
        and float(updates["align_proj"]["w"][0]) == 0.0
    )


def test_a_decoder_only_run_has_a_restore_target_like_its_state():
    """The masked optimiser's frozen part holds no arrays; the restore target still mirrors the
    state, so a decoder-only fine-tune resumes."""
    program, _ = _program(tiny_config(finetune_decoder_only=True))
    state = program.init(0)
    assert jax.tree.structure(program.abstract_state) == jax.tree.structure(state)
    jax.tree.map(
        lambda x, target: (
            x.sharding.is_equivalent_to(target.sharding, x.ndim) or pytest.fail(str(x))
        ),
        state,
        program.abstract_state,
    )
