"""Logit processing shared by the cached and the reference sampler (docs/model.md#sampling-steps):
CFG with the official constant and gradual schedules, temperature, HF-style top-k / top-p filtering,
then independent per-slot sampling or argmax.

Sampler step s counts forward passes: s = 0 .. C-1 are the token-causal steps (step s yields token
s); s >= C are the group steps (official group index i = C/g + (s - C)). The random key of step s is
``fold_in(key, s)``, so any two samplers that produce the same logits produce the same tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from detailflow_jax.config_lib import ConfigError

CFG_SCHEDULES = ("constant", "gradual")


@struct.dataclass
class SamplingSettings:
    """Sampling knobs. ``cfg_scale`` and ``temperature`` are traced (changing them does not
    recompile); the other fields are static. Build it with ``SamplingSettings.create`` unless you
    need to force the guided path."""
    cfg_scale: float = 1.0
    temperature: float = 1.0
    # run the doubled [cond; null] batch
    guidance: bool = struct.field(pytree_node=False, default=False)
    cfg_schedule: str = struct.field(pytree_node=False, default="constant")
    # As LlamaGen's cfg_interval: -1 = guide every step, else guidance stops after step cfg_interval
    # + 1.
    cfg_interval: int = struct.field(pytree_node=False, default=-1)
    top_k: int = struct.field(pytree_node=False, default=0)           # 0 = off
    top_p: float = struct.field(pytree_node=False, default=1.0)       # 1.0 = off
    greedy: bool = struct.field(pytree_node=False, default=False)     # argmax instead of sampling

    @classmethod
    def create(
        cls, cfg_scale: float | None = None, temperature: float = 1.0, **static
    ) -> "SamplingSettings":
        """Guidance is on iff cfg_scale is given and differs from 1 (cfg_scale = 1 is conditional
        sampling)."""
        if not temperature > 0:
            raise ConfigError(f"temperature={temperature!r}: must be positive")
        guidance = cfg_scale is not None and float(cfg_scale) != 1.0
        out = cls(
            cfg_scale=1.0 if cfg_scale is None else float(cfg_scale),
            temperature=float(temperature),
            guidance=guidance,
            **static,
        )
        out.check()
        return out

    def check(self) -> "SamplingSettings":
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ConfigError(f"cfg_schedule={self.cfg_schedule!r}: must be one of {CFG_SCHEDULES}")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k!r}: must be >= 0 (0 disables top-k)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p!r}: must be in (0, 1] (1 disables top-p)")
        if self.cfg_interval < -1:
            raise ConfigError(f"cfg_interval={self.cfg_interval!r}: must be -1 (always) or >= 0")
        return self


def guidance_scale(
    settings: SamplingSettings, step, num_groups: int, group_size: int, causal_num: int
):
    """The CFG scale of step `step`: constant, or for 'gradual' s * (M - i + 1) / (M + 1) at group
    index i."""
    scale = jnp.asarray(settings.cfg_scale, jnp.float32)
    if settings.cfg_schedule == "gradual":
        group_index = causal_num // group_size + (step - causal_num)
        gradual = scale * (num_groups - group_index + 1) / (num_groups + 1)
        scale = jnp.where(step >= causal_num, gradual, scale)
    return scale


def combine_cfg(logits: jax.Array, scale, active=True) -> jax.Array:
    """[cond; uncond] (2B, ...) -> uncond + scale * (cond - uncond) where `active`, else cond."""
    cond, uncond = jnp.split(logits, 2, axis=0)
    return jnp.where(active, uncond + (cond - uncond) * scale, cond)


def top_k_top_p_filter(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """HF `top_k_top_p_filtering` (min_tokens_to_keep = 1) over the last axis; removed logits become
    -inf.

    top-k keeps every logit >= the k-th largest (ties at the threshold survive). top-p then keeps
    the smallest descending prefix whose probability mass reaches top_p (the token that crosses it
    is kept).
    """
    vocab = logits.shape[-1]
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, vocab))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits, order = jax.lax.top_k(logits, vocab)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Shift right so the token that crosses the threshold stays; the most likely token always
        # stays.
        remove_sorted = jnp.concatenate(
            [jnp.zeros_like(cumulative[..., :1], bool), (cumulative > top_p)[..., :-1]], axis=-1)
        remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def select_tokens(
    logits: jax.Array,
    step,
    key: jax.Array,
    settings: SamplingSettings,
    *,
    num_groups: int,
    group_size: int,
    causal_num: int,
) -> jax.Array:
    """Raw model logits of one step ((2B or B), S, V) -> int32 tokens (B, S)."""
    logits = logits.astype(jnp.float32)
    if settings.guidance:
        scale = guidance_scale(settings, step, num_groups, group_size, causal_num)
        active = True if settings.cfg_interval < 0 else step <= settings.cfg_interval + 1
        logits = combine_cfg(logits, scale, active)
    if settings.greedy:
        return first_argmax(logits)
    logits = logits / jnp.maximum(jnp.asarray(settings.temperature, jnp.float32), 1e-5)
    logits = top_k_top_p_filter(logits, settings.top_k, settings.top_p)
    # The Gumbel-max draw of jax.random.categorical (same noise, same tokens), with a faster argmax.
    gumbel = jax.random.gumbel(jax.random.fold_in(key, step), logits.shape, logits.dtype)
    return first_argmax(logits + gumbel)


def first_argmax(x: jax.Array) -> jax.Array:
    """int32 jnp.argmax over the last axis (the first index of the maximum) as two plain reductions:
    XLA:CPU runs argmax's (value, index) reduction ~5x slower, which showed in every sampling step.

    The barrier makes both reductions read ``x`` from memory. Without it the TPU compiler fuses the
    producers of ``x`` (the head matmul, CFG, the Gumbel noise) into the index reduction, and that
    fusion's scoped VMEM outgrows v5e's 16 MiB limit from about 256 rows x 8 slots x an 8,192-way
    vocabulary (the batch of a FID run)."""
    x = jax.lax.optimization_barrier(x)
    is_max = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(
        jnp.where(is_max, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1
    )
