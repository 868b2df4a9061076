"""Optimisers and learning-rate schedules of the official recipes (docs/fidelity.md#training).

A config states its schedule as the official trainers do: a base lr for a reference batch
(``optim.lr_batch``), a run length in epochs and a warm-up in epochs (tokenizer) or as a share of
the run (AR), the floor as a ratio of the peak; explicit step counts (``total_steps``,
``optim.warmup_steps``) override the epochs. ``resolve_*_schedule`` turn that into numbers for one
run (a dataset size and a global batch) without touching the config.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

from detailflow_jax.config_lib import ConfigError, require


@dataclasses.dataclass(frozen=True)
class ResolvedSchedule:
    """What a config's schedule comes to for one run: the learning rates and step counts the trainer
    uses."""
    lr: float             # peak, after scaling with the global batch
    min_lr: float         # end of the cosine
    warmup_lr: float      # start of the linear warm-up
    warmup_steps: int
    total_steps: int
    # full global batches per pass over the data; 0 when the data size is not known
    steps_per_epoch: int

    def describe(self) -> str:
        epochs = (
            f" = {self.total_steps / self.steps_per_epoch:g} epochs of {self.steps_per_epoch:,}"
            if self.steps_per_epoch
            else ""
        )
        return (
            f"{self.total_steps:,} steps{epochs}; lr {self.lr:.4g}, warm-up {self.warmup_steps:,} "
            "steps from "
            f"{self.warmup_lr:.4g}, cosine to {self.min_lr:.4g}"
        )


def _steps_per_epoch(config: ml_collections.ConfigDict, dataset_size: int | None) -> int:
    """Full global batches in one pass (the official loaders drop the last partial batch)."""
    return dataset_size // config.batch_size if dataset_size else 0


def _from_epochs(epochs: float, steps_per_epoch: int, field: str, dataset_size: int | None) -> int:
    if not steps_per_epoch:
        what = (
            "is not known here" if dataset_size is None else f"({dataset_size}) holds no full batch"
        )
        raise ConfigError(
            f"{field} is derived from epochs, but the dataset size {what}: set {field} explicitly "
            "or pass the dataset size"
        )
    return round(epochs * steps_per_epoch)


def _total_steps(config, steps_per_epoch: int, dataset_size: int | None) -> int:
    total = config.total_steps or _from_epochs(
        config.epochs, steps_per_epoch, "total_steps", dataset_size
    )
    require(
        total > 0,
        "total_steps",
        config.total_steps,
        "must be positive (0: epochs x steps per epoch)",
    )
    return total


def scaled_lr(optim_cfg: ml_collections.ConfigDict, batch_size: int) -> float:
    """``lr x batch / lr_batch`` (official tokenizer: lr x B / 256); ``lr_batch`` 0 uses ``lr`` at
    any batch."""
    require(
        optim_cfg.lr_batch >= 0,
        "optim.lr_batch",
        optim_cfg.lr_batch,
        "must be >= 0 (0: no scaling)",
    )
    return optim_cfg.lr * batch_size / optim_cfg.lr_batch if optim_cfg.lr_batch else optim_cfg.lr


def resolve_tokenizer_schedule(
    config: ml_collections.ConfigDict, dataset_size: int | None
) -> ResolvedSchedule:
    """Official ``train_tokenizer.py``: lr scaled with the batch, floor ``min_lr_ratio`` x that,
    warm-up of ``warmup_epochs`` epochs from the absolute ``warmup_lr``, ``epochs`` x steps per
    epoch in all. ``dataset_size`` None: only the explicit step counts can be used."""
    o = config.optim
    per_epoch = _steps_per_epoch(config, dataset_size)
    total = _total_steps(config, per_epoch, dataset_size)
    warmup = o.warmup_steps if o.warmup_steps >= 0 else _from_epochs(
        o.warmup_epochs, per_epoch, "optim.warmup_steps", dataset_size)
    lr = scaled_lr(o, config.batch_size)
    return ResolvedSchedule(
        lr=lr,
        min_lr=o.min_lr_ratio * lr,
        warmup_lr=o.warmup_lr,
        warmup_steps=warmup,
        total_steps=total,
        steps_per_epoch=per_epoch,
    )


def resolve_ar_schedule(
    config: ml_collections.ConfigDict, dataset_size: int | None
) -> ResolvedSchedule:
    """Official ``train_c2i.py``: ``epochs`` x steps per epoch, warm-up ``int(warmup_fraction x
    total)`` steps from ``warmup_lr_ratio`` x lr, cosine to ``min_lr_ratio`` x lr (the lr is not
    scaled there: ``lr_batch`` 0)."""
    o = config.optim
    per_epoch = _steps_per_epoch(config, dataset_size)
    total = _total_steps(config, per_epoch, dataset_size)
    warmup = o.warmup_steps if o.warmup_steps >= 0 else int(o.warmup_fraction * total)
    lr = scaled_lr(o, config.batch_size)
    return ResolvedSchedule(lr=lr, min_lr=o.min_lr_ratio * lr, warmup_lr=o.warmup_lr_ratio * lr,
                            warmup_steps=warmup, total_steps=total, steps_per_epoch=per_epoch)


def _warmup(s: ResolvedSchedule, step):
    return s.warmup_lr + step * (s.lr - s.warmup_lr) / max(s.warmup_steps, 1)


def tokenizer_schedule(s: ResolvedSchedule) -> optax.Schedule:
    """timm ``CosineLRScheduler`` as the tokenizer uses it: linear warm-up from ``warmup_lr``, then
    a cosine over the *whole* run (the cosine phase is not offset by the warm-up) down to
    ``min_lr``."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        cos = s.min_lr + 0.5 * (s.lr - s.min_lr) * (
            1 + jnp.cos(jnp.pi * step / max(s.total_steps, 1))
        )
        return jnp.where(step < s.warmup_steps, _warmup(s, step), cos)

    return schedule


def ar_schedule(s: ResolvedSchedule) -> optax.Schedule:
    """The AR ``LambdaLR``: linear warm-up from ``warmup_lr`` (official 0.005 x lr), then a cosine
    from lr to ``min_lr`` (0.01 x lr) over the steps after the warm-up."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip(
            (step - s.warmup_steps) / max(s.total_steps - s.warmup_steps, 1), 0.0, 1.0
        )
        cos = s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < s.warmup_steps, _warmup(s, step), cos)

    return schedule


def adam(
    schedule: optax.Schedule, b1: float = 0.9, b2: float = 0.95, clip_norm: float | None = 1.0
):
    """Adam without weight decay, gradients clipped to ``clip_norm`` first (tokenizer and
    discriminator)."""
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
    """``tx`` on the leaves whose key path satisfies ``trains(path)``; the others get zero updates
    and no optimiser state (PyTorch ``requires_grad=False``: Adam neither moves nor tracks them, and
    the gradient clip inside ``tx`` measures only the trained gradients)."""
    labels = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: "train" if trains(path) else "frozen", tree)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
