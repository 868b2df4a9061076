"""Adversarial loss terms and their step schedules (official ``VQLoss`` in ``losses/vq_loss.py``).

Generator:      L_adv = w_d(step) * hinge_g(D(Aug(x_hat)))
Discriminator:  L_D   = w_d(step) * [hinge_d(D(Aug(y)), D(Aug(x_hat))) + 0.001 * LeCAM] + c(step) * L_CR

Everything is a pure function; the LeCAM EMAs are an explicit ``LeCAMState`` pytree that the train
step carries (update it every discriminator step, from step 1, also while w_d = 0 — as the official
code does). ``step`` is the 1-based step (``train_steps + 1``) and may be a traced integer.

``weight`` (B,), where given, says which samples of the logits (B, …) count (1) and which do not
(0): the tokenizer step's t = 1 batch carries a zero-weight half that the official discriminator
never sees.
"""  # noqa: E501

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


def sample_mean(x: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Weighted mean of x (B, …) over the samples of nonzero ``weight`` (B,); else the plain
    mean."""
    x = x.astype(jnp.float32)
    if weight is None:
        return jnp.mean(x)
    w = jnp.broadcast_to(weight.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
    return jnp.sum(jnp.where(w > 0, x, 0.0) * w) / jnp.maximum(jnp.sum(w), 1.0)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array,
                 weight: jax.Array | None = None) -> jax.Array:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    real = sample_mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)), weight)
    fake = sample_mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)), weight)
    return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """-mean D(fake)."""
    return -sample_mean(logits_fake, weight)


class LeCAMState(NamedTuple):
    """Scalar running means of the discriminator's real and fake logits (Tseng et al. 2021)."""

    real_ema: jax.Array
    fake_ema: jax.Array


def lecam_init() -> LeCAMState:
    return LeCAMState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def lecam_update(state: LeCAMState, logits_real: jax.Array, logits_fake: jax.Array,
                 decay: float = 0.999, weight: jax.Array | None = None) -> LeCAMState:
    """ema <- decay * ema + (1 - decay) * mean(logits); no gradient flows into the EMAs (official:
    ``.item()``)."""
    real = jax.lax.stop_gradient(sample_mean(logits_real, weight))
    fake = jax.lax.stop_gradient(sample_mean(logits_fake, weight))
    return LeCAMState(
        decay * state.real_ema + (1 - decay) * real, decay * state.fake_ema + (1 - decay) * fake
    )


def lecam_reg(logits_real: jax.Array, logits_fake: jax.Array, state: LeCAMState,
              weight: jax.Array | None = None) -> jax.Array:
    """mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2)."""
    real = jax.nn.relu(logits_real.astype(jnp.float32) - state.fake_ema)
    fake = jax.nn.relu(state.real_ema - logits_fake.astype(jnp.float32))
    return sample_mean(real**2, weight) + sample_mean(fake**2, weight)


def consistency_loss(real_weak: jax.Array, fake_weak: jax.Array, real_strong: jax.Array,
                     fake_strong: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """MSE(concat[D(real), D(fake)], concat[D(strong(real)), D(strong(fake))]); the weak logits are
    not detached."""
    weak = jnp.concatenate([real_weak, fake_weak]).astype(jnp.float32)
    strong = jnp.concatenate([real_strong, fake_strong]).astype(jnp.float32)
    both = None if weight is None else jnp.concatenate([weight, weight])
    return sample_mean((weak - strong) ** 2, both)


@dataclasses.dataclass(frozen=True)
class GANSchedule:
    """Loss weights as functions of the 1-based step (official defaults of the DetailFlow tokenizer
    configs)."""

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
        return (
            jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / self.perceptual_warmup)
            * self.perceptual_weight
        )

    def adversarial(self, step) -> jax.Array:
        """w_d = 0 before ``disc_start``, then ``disc_weight`` (no adaptive weight)."""
        return jnp.where(jnp.asarray(step) < self.disc_start, 0.0, self.disc_weight).astype(
            jnp.float32
        )

    def consistency(self, step) -> jax.Array:
        """c = ``cr_weight`` from ``disc_start`` on, else 0 (not multiplied by w_d)."""
        return jnp.where(jnp.asarray(step) < self.disc_start, 0.0, self.cr_weight).astype(
            jnp.float32
        )


def discriminator_loss(schedule: GANSchedule, step, lecam: LeCAMState, logits_real: jax.Array,
                       logits_fake: jax.Array, strong_real: jax.Array | None = None,
                       strong_fake: jax.Array | None = None,
                       weight: jax.Array | None = None) -> tuple[jax.Array, LeCAMState, dict]:
    """The official discriminator objective. Returns (loss, new LeCAM state, metrics).

    The LeCAM EMAs are updated *before* the regulariser is computed (official order). Pass the
    logits of the strongly augmented batches to add consistency regularisation; without them the CR
    term is left out.
    """
    lecam = lecam_update(lecam, logits_real, logits_fake, schedule.lecam_decay, weight)
    hinge = hinge_d_loss(logits_real, logits_fake, weight)
    reg = lecam_reg(logits_real, logits_fake, lecam, weight)
    loss = schedule.adversarial(step) * (hinge + schedule.lecam_weight * reg)
    metrics = {"d_hinge": hinge, "d_lecam": reg, "logits_real": sample_mean(logits_real, weight),
               "logits_fake": sample_mean(logits_fake, weight)}
    if (strong_real is None) != (strong_fake is None):
        raise ValueError(
            "consistency regularisation needs the strong logits of both the real and the fake batch"
        )
    if strong_real is not None:
        cr = consistency_loss(logits_real, logits_fake, strong_real, strong_fake, weight)
        loss = loss + schedule.consistency(step) * cr
        metrics["d_cr"] = cr
    return loss, lecam, metrics
