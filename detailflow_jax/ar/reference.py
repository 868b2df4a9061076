"""Reference sampler without KV cache: the official `generate_group_par` loop
(docs/model.md#sampling-steps).

Every step re-runs the teacher-forced forward over the whole prefix (class token, special tokens
inserted once the prefix holds C tokens, group-causal mask, 2D RoPE) and samples from the logits of
the last 1 (token steps) or last g (group steps) inputs. It is the test oracle of the cached sampler
and the benchmark baseline. Unlike the official code it also allows sampling without CFG.

Two ways to run the forward:
  * ``fixed_length=False`` (benchmark baseline): the prefix has its true length, so the step
    function is compiled once per prefix length, as torch.compile does for the official sampler.
  * ``fixed_length=True`` (fast oracle for tests): the prefix is zero-padded to N - g tokens and the
    forward always runs the full training length; the padding sits at later positions, which the
    group-causal mask hides from every position read, so the logits are the same and there is a
    single compilation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from detailflow_jax.ar.logits import SamplingSettings, select_tokens
from detailflow_jax.ar.model import GPT


class ReferenceSampler:
    def __init__(self, model: GPT, fixed_length: bool = False):
        self.model = model
        self.cfg = model.cfg
        self.fixed_length = fixed_length
        self._step = jax.jit(self._step_fn, static_argnums=(6,))

    @property
    def jitted_step(self):
        """The jitted (params, prefix, labels, key, settings, step, num_new) -> tokens of one step
        (num_new static), which ``__call__`` runs once per sampling step (for ahead-of-time
        compilation)."""
        return self._step

    def _step_fn(self, params, prefix, labels, key, settings: SamplingSettings, step, num_new: int):
        """Tokens of step `step` from the forward over `prefix` (B, T); the new inputs sit at
        positions T .. T + num_new - 1 of the official sequence (T = s for token steps, C + (s - C)
        g for group steps)."""
        cfg = self.cfg
        cond = labels
        if settings.guidance:
            prefix = jnp.concatenate([prefix, prefix])
            cond = jnp.concatenate([labels, jnp.full_like(labels, cfg.num_classes)])
        logits = self.model.apply({"params": params}, prefix, cond)
        start = jnp.where(
            step < cfg.causal_num, step, cfg.causal_num + (step - cfg.causal_num) * cfg.group_size
        )
        logits = jax.lax.dynamic_slice_in_dim(logits, start, num_new, axis=1)
        return select_tokens(
            logits,
            step,
            key,
            settings,
            num_groups=cfg.num_groups,
            group_size=cfg.group_size,
            causal_num=cfg.causal_num,
        )

    def __call__(
        self, params: Any, labels, key: jax.Array, settings: SamplingSettings | None = None
    ) -> jax.Array:
        settings = SamplingSettings() if settings is None else settings.check()
        cfg = self.cfg
        labels = jnp.asarray(labels, jnp.int32)
        tokens = jnp.zeros((labels.shape[0], 0), jnp.int32)
        for step in range(cfg.num_steps):
            num_new = 1 if step < cfg.causal_num else cfg.group_size
            prefix = tokens
            if self.fixed_length:
                prefix = jnp.pad(
                    tokens, ((0, 0), (0, max(cfg.num_tokens - cfg.group_size - tokens.shape[1], 0)))
                )
            new = self._step(params, prefix, labels, key, settings, jnp.int32(step), num_new)
            tokens = jnp.concatenate([tokens, new], axis=1)
        return tokens
