"""Optimisers and learning-rate schedules of the official recipes (docs/fidelity.md#training)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def tokenizer_schedule(base_lr: float, warmup_steps: int, total_steps: int, warmup_lr: float = 1e-5,
                       min_lr: float = 1e-5) -> optax.Schedule:
    """timm ``CosineLRScheduler`` as the tokenizer uses it: linear warm-up from ``warmup_lr``, then a cosine over
    the *whole* run (the cosine phase is not offset by the warm-up) down to ``min_lr``."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = warmup_lr + step * (base_lr - warmup_lr) / max(warmup_steps, 1)
        cos = min_lr + 0.5 * (base_lr - min_lr) * (1 + jnp.cos(jnp.pi * step / max(total_steps, 1)))
        return jnp.where(step < warmup_steps, warm, cos)

    return schedule


def ar_schedule(base_lr: float, total_steps: int, warmup_fraction: float = 0.05) -> optax.Schedule:
    """The AR ``LambdaLR``: factor 0.005 -> 1 over the warm-up, then cosine from 1 to 0.01 (1e-4 -> 1e-6)."""
    warmup = max(int(warmup_fraction * total_steps), 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = 0.005 + 0.995 * step / warmup
        progress = (step - warmup) / max(total_steps - warmup, 1)
        cos = 0.01 + 0.99 * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
        return base_lr * jnp.where(step < warmup, warm, cos)

    return schedule


def adam(schedule: optax.Schedule, b1: float = 0.9, b2: float = 0.95, clip_norm: float | None = 1.0):
    """Adam without weight decay, gradients clipped to ``clip_norm`` first (tokenizer and discriminator)."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    return optax.chain(*parts, optax.adam(schedule, b1=b1, b2=b2))


def decay_mask(params, stacked_key: str = "layers"):
    """True for the parameters AdamW decays: rank >= 2 per layer (matrices, not norm scales).

    Under ``stacked_key`` (the ``nn.scan`` of a ``scan_layers`` model, whose parameters carry a
    leading layer axis) the rank is counted without that axis: a stacked (L, D) norm scale is not
    decayed.
    """

    def per_layer_rank_ok(path, p):
        stacked = any(getattr(k, "key", None) == stacked_key for k in path)
        return p.ndim - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(per_layer_rank_ok, params)


def adamw(schedule: optax.Schedule, weight_decay: float = 0.05, b1: float = 0.9, b2: float = 0.95,
          clip_norm: float | None = 1.0):
    """AdamW with decay only on parameters of per-layer rank >= 2 (``decay_mask``), as the AR."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    return optax.chain(*parts, optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                                           mask=decay_mask))


def train_only(tx: optax.GradientTransformation, trains) -> optax.GradientTransformation:
    """``tx`` on the leaves whose key path satisfies ``trains(path)``; the others get zero updates and no
    optimiser state (PyTorch ``requires_grad=False``: Adam neither moves nor tracks them, and the gradient clip
    inside ``tx`` measures only the trained gradients)."""
    labels = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: "train" if trains(path) else "frozen", tree)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
