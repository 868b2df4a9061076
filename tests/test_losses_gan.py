"""Hinge / LeCAM / consistency terms on hand-computed inputs, the step schedules, and the PatchGAN
discriminator."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from detailflow_jax.losses.gan import (
    GANSchedule,
    consistency_loss,
    discriminator_loss,
    hinge_d_loss,
    hinge_g_loss,
    lecam_init,
    lecam_reg,
    lecam_update,
)
from detailflow_jax.losses.patchgan import PatchGANDiscriminator


def key(seed):
    # RBG keys: XLA:CPU compiles partitionable-threefry random ops ~10x slower, which dominates
    # these tiny tests.
    return jax.random.key(seed, impl="rbg")


REAL = jnp.array([[2.0, 0.5], [-1.0, 1.0]])
FAKE = jnp.array([[-2.0, 0.0], [1.0, -0.5]])


def test_hinge_losses():
    # relu(1 - real) = [0, .5, 2, 0] -> mean .625; relu(1 + fake) = [0, 1, 2, .5] -> mean .875
    np.testing.assert_allclose(hinge_d_loss(REAL, FAKE), 0.5 * (0.625 + 0.875))
    np.testing.assert_allclose(hinge_g_loss(FAKE), 0.375)


def test_lecam_ema_and_regulariser():
    state = lecam_init()
    state = lecam_update(state, REAL, FAKE, decay=0.9)  # means 0.625, -0.375
    np.testing.assert_allclose([state.real_ema, state.fake_ema], [0.0625, -0.0375], rtol=1e-6)
    state = lecam_update(state, REAL, FAKE, decay=0.9)
    np.testing.assert_allclose([state.real_ema, state.fake_ema], [0.11875, -0.07125], rtol=1e-6)
    # relu(real - ema_fake)^2 and relu(ema_real - fake)^2 with ema_real = 0.5, ema_fake = 0.25
    reg = lecam_reg(
        REAL, FAKE, state._replace(real_ema=jnp.float32(0.5), fake_ema=jnp.float32(0.25))
    )
    expected = np.mean(np.array([1.75, 0.25, 0.0, 0.75]) ** 2) + np.mean(
        np.array([2.5, 0.5, 0.0, 1.0]) ** 2
    )
    np.testing.assert_allclose(reg, expected, rtol=1e-6)
    # The EMAs are statistics, not part of the graph.
    g = jax.grad(lambda r: lecam_update(lecam_init(), r, FAKE).real_ema)(REAL)
    np.testing.assert_array_equal(g, 0.0)


def test_consistency_loss_is_mse_of_concatenated_logits():
    np.testing.assert_allclose(
        consistency_loss(REAL, FAKE, REAL + 1.0, FAKE - 2.0), (8 * 1 + 8 * 4) / 16 * 2 / 2
    )


def test_schedules():
    s = GANSchedule()
    np.testing.assert_allclose(
        [s.perceptual(1), s.perceptual(5000), s.perceptual(10_000), s.perceptual(50_000)],
        [1e-4, 0.5, 1.0, 1.0],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        [s.adversarial(t) for t in (1, 39_999, 40_000, 90_000)], [0, 0, 0.2, 0.2], rtol=1e-6
    )
    np.testing.assert_allclose([s.consistency(t) for t in (39_999, 40_000)], [0.0, 4.0])
    assert float(GANSchedule(perceptual_warmup=None, perceptual_weight=0.5).perceptual(3)) == 0.5
    # traced steps work
    assert float(jax.jit(s.adversarial)(jnp.int32(40_000))) == pytest.approx(0.2)


def test_discriminator_loss_composition():
    s = GANSchedule(disc_start=10, lecam_decay=0.9)
    loss, state, metrics = discriminator_loss(s, 5, lecam_init(), REAL, FAKE, REAL, FAKE)
    assert float(loss) == 0.0 and float(state.real_ema) != 0.0  # EMAs update before disc_start too
    loss, _, metrics = discriminator_loss(s, 10, lecam_init(), REAL, FAKE, REAL + 1.0, FAKE - 2.0)
    ema = lecam_update(lecam_init(), REAL, FAKE, 0.9)  # updated first, then used (official order)
    expected = 0.2 * (hinge_d_loss(REAL, FAKE) + 0.001 * lecam_reg(REAL, FAKE, ema)) + 4.0 * 2.5
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert set(metrics) >= {"d_hinge", "d_lecam", "d_cr"}
    with pytest.raises(ValueError, match="both"):
        discriminator_loss(s, 10, lecam_init(), REAL, FAKE, REAL, None)


def test_patchgan_shapes_and_one_step_moves_d_the_right_way():
    disc = PatchGANDiscriminator(ndf=8, n_layers=2)
    real = jax.random.uniform(key(0), (4, 32, 32, 3), minval=-1, maxval=1)
    fake = jnp.tanh(jax.random.normal(key(1), (4, 32, 32, 3)) * 0.3) * 0.2
    variables = jax.jit(lambda: disc.init(key(2), real))()
    full_size = jax.eval_shape(lambda: PatchGANDiscriminator().init_with_output(
        key(0), jnp.zeros((1, 256, 256, 3)), train=False)[0])
    assert full_size.shape == (1, 900)  # the 30x30 patch map of the pix2pix / taming default

    opt = optax.adam(1e-3)

    def loss_fn(params, stats):
        logits, upd = disc.apply(
            {"params": params, "batch_stats": stats},
            jnp.concatenate([real, fake]),
            train=True,
            mutable=["batch_stats"],
        )
        return hinge_d_loss(logits[:4], logits[4:]), (logits, upd["batch_stats"])

    @jax.jit
    def step(params, stats, opt_state):
        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), stats, opt_state, loss, logits

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = opt.init(params)
    params2, stats2, opt_state, loss0, logits0 = step(params, stats, opt_state)
    _, _, _, loss1, logits1 = step(params2, stats2, opt_state)
    assert logits0.shape == (8, 36)  # 32 -> 16 -> 8 (stride 2) -> 7 -> 6 (stride 1, k4 p1)
    assert float(loss1) < float(loss0)
    margin = lambda lg: float(lg[:4].mean() - lg[4:].mean())  # noqa: E731
    assert margin(logits1) > margin(logits0)
    # running stats were updated
    assert not np.allclose(stats2["norm_1"]["mean"], stats["norm_1"]["mean"])
