"""Adversarial loss terms and their step schedules (official ``VQLoss`` in ``losses/vq_loss.py``).

Generator:      L_adv = w_d(step) * hinge_g(D(Aug(x_hat)))
Discriminator:  L_D   = w_d(step) * [hinge_d(D(Aug(y)), D(Aug(x_hat))) + 0.001 * LeCAM] + c(step) * L_CR

Everything is a pure function; the LeCAM EMAs are an explicit ``LeCAMState`` pytree that the train step carries
(update it every discriminator step, from step 1, also while w_d = 0 — as the official code does). ``step`` is the
1-based step (``train_steps + 1``) and may be a traced integer.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
    """-mean D(fake)."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


class LeCAMState(NamedTuple):
    """Scalar running means of the discriminator's real and fake logits (Tseng et al. 2021)."""

    real_ema: jax.Array
    fake_ema: jax.Array


def lecam_init() -> LeCAMState:
    return LeCAMState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def lecam_update(state: LeCAMState, logits_real: jax.Array, logits_fake: jax.Array,
                 decay: float = 0.999) -> LeCAMState:
    """ema <- decay * ema + (1 - decay) * mean(logits); no gradient flows into the EMAs (official: ``.item()``)."""
    real = jax.lax.stop_gradient(jnp.mean(logits_real.astype(jnp.float32)))
    fake = jax.lax.stop_gradient(jnp.mean(logits_fake.astype(jnp.float32)))
    return LeCAMState(decay * state.real_ema + (1 - decay) * real, decay * state.fake_ema + (1 - decay) * fake)


def lecam_reg(logits_real: jax.Array, logits_fake: jax.Array, state: LeCAMState) -> jax.Array:
    """mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2)."""
    real = jax.nn.relu(logits_real.astype(jnp.float32) - state.fake_ema)
    fake = jax.nn.relu(state.real_ema - logits_fake.astype(jnp.float32))
    return jnp.mean(real**2) + jnp.mean(fake**2)


def consistency_loss(real_weak: jax.Array, fake_weak: jax.Array, real_strong: jax.Array,
                     fake_strong: jax.Array) -> jax.Array:
    """MSE(concat[D(real), D(fake)], concat[D(strong(real)), D(strong(fake))]); the weak logits are not detached."""
    weak = jnp.concatenate([real_weak, fake_weak]).astype(jnp.float32)
    strong = jnp.concatenate([real_strong, fake_strong]).astype(jnp.float32)
    return jnp.mean((weak - strong) ** 2)


@dataclasses.dataclass(frozen=True)
class GANSchedule:
    """Loss weights as functions of the 1-based step (official defaults of the DetailFlow tokenizer configs)."""

    disc_start: int = 40_000
    disc_weight: float = 0.2
    perceptual_weight: float = 1.0
    perceptual_warmup: int | None = 10_000
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    cr_weight: float = 4.0

    def perceptual(self, step) -> jax.Array:
        """w_p = min(1, step / warmup) * w (constant w without warm-up)."""
        if not self.perceptual_warmup:
            return jnp.float32(self.perceptual_weight)
        return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / self.perceptual_warmup) * self.perceptual_weight

    def adversarial(self, step) -> jax.Array:
        """w_d = 0 before ``disc_start``, then ``disc_weight`` (no adaptive weight)."""
        return jnp.where(jnp.asarray(step) < self.disc_start, 0.0, self.disc_weight).astype(jnp.float32)

    def consistency(self, step) -> jax.Array:
        """c = ``cr_weight`` from ``disc_start`` on, else 0 (not multiplied by w_d)."""
        return jnp.where(jnp.asarray(step) < self.disc_start, 0.0, self.cr_weight).astype(jnp.float32)


def discriminator_loss(schedule: GANSchedule, step, lecam: LeCAMState, logits_real: jax.Array,
                       logits_fake: jax.Array, strong_real: jax.Array | None = None,
                       strong_fake: jax.Array | None = None) -> tuple[jax.Array, LeCAMState, dict]:
    """The official discriminator objective. Returns (loss, new LeCAM state, metrics).

    The LeCAM EMAs are updated *before* the regulariser is computed (official order). Pass the logits of the
    strongly augmented batches to add consistency regularisation; without them the CR term is left out.
    """
    lecam = lecam_update(lecam, logits_real, logits_fake, schedule.lecam_decay)
    hinge = hinge_d_loss(logits_real, logits_fake)
    reg = lecam_reg(logits_real, logits_fake, lecam)
    loss = schedule.adversarial(step) * (hinge + schedule.lecam_weight * reg)
    metrics = {"d_hinge": hinge, "d_lecam": reg, "logits_real": jnp.mean(logits_real),
               "logits_fake": jnp.mean(logits_fake)}
    if (strong_real is None) != (strong_fake is None):
        raise ValueError("consistency regularisation needs the strong logits of both the real and the fake batch")
    if strong_real is not None:
        cr = consistency_loss(logits_real, logits_fake, strong_real, strong_fake)
        loss = loss + schedule.consistency(step) * cr
        metrics["d_cr"] = cr
    return loss, lecam, metrics
