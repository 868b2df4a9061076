"""The discriminator side of the tokenizer step as the official code runs it: every DINO call draws
its own crop, every train-mode call's spectral-norm power iteration and BatchNorm update is kept,
and the t = 1 discriminator sees only the B clean reconstructions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax import sharding
from detailflow_jax.losses import dino as dino_module
from detailflow_jax.losses import gan
from detailflow_jax.losses.discriminator import DinoDiscriminator, _l2_normalize
from detailflow_jax.losses.patchgan import PatchGANDiscriminator
from detailflow_jax.tokenizer.degradation import degradation_matrix
from detailflow_jax.train.tokenizer_step import FrozenNets, TokenizerLosses, make_tokenizer_step
from test_tokenizer_training import _batch, tiny_config

# A tiny DINO discriminator whose 16-px input is smaller than the 32-px canvas, so every call may
# crop.
TINY_DINO = dict(width=32, heads=2, patch=8, img_size=16, key_depths=(0,))


def _tiny_dino_program(config, frozen):
    """The step of ``config`` with the tiny DINO discriminator (a fresh program: a fresh trace)."""
    losses = dataclasses.replace(
        TokenizerLosses.from_config(config), disc=DinoDiscriminator(**TINY_DINO)
    )
    return make_tokenizer_step(
        config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]), frozen, losses=losses
    )


def _one_step(config, state, frozen, t, noise):
    program = _tiny_dino_program(config, frozen)
    tables = program.tables
    return program.steps[tables.canvas[t]](
        state,
        frozen.params,
        _batch(config),
        np.int32(t),
        jnp.asarray(degradation_matrix(t, tables)),
        np.int32(noise[0]),
        np.int32(noise[1]),
    )


@pytest.fixture(scope="module")
def tiny_dino_step():
    """(config, initial state, frozen nets) of a tokenizer step with the tiny DINO discriminator."""
    config = tiny_config(**{"losses.disc_type": "dino", "losses.disc_start": 0})
    x = jnp.zeros((1, 16, 16, 3))
    backbone = DinoDiscriminator(**TINY_DINO).backbone()
    frozen = FrozenNets({"dino": jax.jit(lambda: backbone.init(jax.random.key(5), x)["params"])()})
    return config, _tiny_dino_program(config, frozen).init(0), frozen


def test_every_dino_call_draws_its_own_crop(tiny_dino_step, monkeypatch):
    config, state, frozen = tiny_dino_step
    drawn = []
    original = dino_module.crop_choice

    def recording(key, *args):
        choice = original(key, *args)
        jax.debug.callback(lambda *c: drawn.append(tuple(int(v) for v in c)), *choice)
        return choice

    monkeypatch.setattr(dino_module, "crop_choice", recording)
    # A fresh program traces again, with the recording crop_choice.
    jax.block_until_ready(_one_step(config, jax.tree.map(jnp.copy, state), frozen, 32, (4, 8)))
    # generator call, then real, fake, strong real, strong fake: five calls, five independent draws
    assert len(drawn) == 5, drawn
    assert len(set(drawn)) == 5, drawn


def _power_iterations(kernel, u, n):
    """n torch spectral-norm power iterations on the kernel as (out, in·k)."""
    w = jnp.transpose(kernel, (2, 1, 0)).reshape(kernel.shape[2], -1)
    for _ in range(n):
        v = _l2_normalize(w.T @ u, 1e-12)
        u = _l2_normalize(w @ v, 1e-12)
    return u


def test_every_train_mode_call_keeps_its_power_iteration(tiny_dino_step):
    """Official: one generator-side call and four discriminator-side calls per step
    (``losses/vq_loss.py``), all in train mode, each updating u, v in place; all five are kept."""
    config, state, frozen = tiny_dino_step
    before = jax.device_get(state["disc"])
    new, _ = _one_step(config, jax.tree.map(jnp.copy, state), frozen, 32, (4, 8))
    after = jax.device_get(new["disc"]["batch_stats"])
    for head in before["params"]:
        for conv in ("block_conv", "residual_conv"):  # "out" has one output: its u is ±1 at once
            kernel = before["params"][head][conv]["kernel"]
            u0 = before["batch_stats"][head][conv]["u"]
            expected = _power_iterations(kernel, u0, 5)
            # the test can tell
            assert not np.allclose(_power_iterations(kernel, u0, 2), expected, atol=1e-4)
            np.testing.assert_allclose(
                after[head][conv]["u"], expected, atol=1e-5, err_msg=f"{head}/{conv}"
            )


def _close(got, want):
    scale = max(float(np.abs(np.asarray(want)).max()), 1e-6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("kind", ["dino", "patchgan"])
def test_masked_samples_are_absent_from_the_discriminator_batch(kind):
    """At t = 1 the official discriminator sees the B clean reconstructions alone; the project's 2B
    batch with a zero-weight half must give the same logits for the B and the same BatchNorm
    statistics."""
    b = 2
    x = jax.random.uniform(jax.random.key(0), (b, 16, 16, 3), minval=-1, maxval=1)
    junk = 3.0 * jax.random.normal(jax.random.key(1), (b, 16, 16, 3))
    both, mask = jnp.concatenate([x, junk]), jnp.array([True] * b + [False] * b)
    if kind == "dino":
        disc = DinoDiscriminator(**TINY_DINO)
        backbone = jax.jit(lambda: disc.backbone().init(jax.random.key(2), x)["params"])()
        args = (backbone, True, None)
        variables = jax.jit(lambda: disc.init(jax.random.key(3), x, backbone, False))()
    else:
        disc = PatchGANDiscriminator(ndf=8, n_layers=2)
        args = (True,)
        variables = jax.jit(lambda: disc.init(jax.random.key(3), x, False))()
    run = jax.jit(
        lambda images, m: disc.apply(variables, images, *args, m, mutable=["batch_stats"])
    )
    alone, stats_alone = run(x, None)
    masked, stats_masked = run(both, mask)
    _close(masked[:b], alone)
    jax.tree.map(_close, stats_masked, stats_alone)


def test_zero_weight_samples_do_not_count_in_the_discriminator_loss():
    b, p = 3, 5
    logits = [jax.random.normal(jax.random.key(i), (2 * b, p)) for i in range(4)]
    weight = jnp.array([1.0] * b + [0.0] * b)
    schedule = gan.GANSchedule(disc_start=0)
    lecam = gan.LeCAMState(jnp.float32(0.3), jnp.float32(-0.2))
    loss_w, lecam_w, m_w = gan.discriminator_loss(schedule, 1, lecam, *logits, weight=weight)
    loss, lecam_b, m = gan.discriminator_loss(schedule, 1, lecam, *(x[:b] for x in logits))
    _close(loss_w, loss)
    jax.tree.map(_close, (lecam_w, m_w), (lecam_b, m))
    _close(gan.hinge_g_loss(logits[0], weight), gan.hinge_g_loss(logits[0][:b]))
