"""The KV-cache group-parallel sampler: one jitted function (params, labels, key, settings) -> tokens (B, N).

Inside one jit (spec §4.1, jax-practices §5.3):
  * a ``lax.scan`` over the C token-causal steps: step 0 feeds the class token at position 0, step s > 0 feeds
    token s - 1 at position s; each writes one cache slot and samples token s;
  * a ``lax.scan`` over the (N - C) / g group steps: group step k feeds g inputs at positions C + k g ...
    (for k = 0 the last causal token plus the g - 1 special tokens, afterwards the previous group's tokens), writes
    g cache slots with ``dynamic_update_slice`` and samples g tokens independently.
Forward passes: C + (N - C) / g (23 / 39 / 71 for N = 128 / 256 / 512 with g = C = 8).

CFG runs a doubled [cond; null] batch. The cache is an explicit pytree, per layer {"k", "v"} (`init_cache`) —
Linen's ``decode=True`` cache can only take one token per call. Each layer writes its slots in place and
attends to its own buffer, so a step moves the weights and the visible cache once and copies nothing else. A
``scan_layers`` model is run unrolled: its stacked weights are split once per call, before the loops, because
slicing them inside the step would copy every layer's weights at every step.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.sharding import Mesh, PartitionSpec as P

from detailflow_jax import sharding as shd
from detailflow_jax.ar.logits import SamplingSettings, select_tokens
from detailflow_jax.ar.model import CACHE_AXES, GPT, init_cache, unrolled, unstack_layers

__all__ = ["Sampler", "SamplingSettings"]


class Sampler:
    """Jitted cached sampler for one model. Same shapes and static settings never retrace (``num_traces``).

    Args:
      model: the GPT module.
      mesh: optional mesh; the batch (labels in, tokens out, KV cache) is then sharded over its data axes.
      param_shardings: NamedSharding tree (or prefix) of the params on ``mesh``; default replicated.
    """

    def __init__(self, model: GPT, mesh: Mesh | None = None, param_shardings: Any = None,
                 rules=shd.DEFAULT_RULES):
        self.model = GPT(unrolled(model.cfg))
        self.cfg = model.cfg
        self.mesh = mesh
        self.rules = rules
        self.num_traces = 0
        if mesh is None:
            self._jitted = jax.jit(self._sample)
        else:
            replicated = shd.replicated(mesh)
            self._jitted = jax.jit(
                self._sample,
                in_shardings=(replicated if param_shardings is None else param_shardings,
                              shd.batch_sharding(mesh, 1), replicated, replicated),
                out_shardings=shd.batch_sharding(mesh, 2))

    def __call__(self, params: Any, labels, key: jax.Array, settings: SamplingSettings | None = None) -> jax.Array:
        settings = SamplingSettings() if settings is None else settings.check()
        labels = jnp.asarray(labels, jnp.int32)
        if labels.ndim != 1:
            raise ValueError(f"labels must be a (B,) vector of class ids, got shape {labels.shape}")
        if self.mesh is not None:
            data = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            if labels.shape[0] % data:
                raise ValueError(f"batch {labels.shape[0]} is not divisible by the {data} devices of the mesh's data "
                                 "axes (data x fsdp); pad the labels or change the mesh")
        return self._jitted(params, labels, key, settings)

    # ---- the traced program -----------------------------------------------------------------------------------

    def _constrain_cache(self, cache):
        if self.mesh is None:
            return cache
        shardings = {name: nn.logical_to_mesh_sharding(P(*axes), self.mesh, self.rules)
                     for name, axes in CACHE_AXES.items()}
        return [{name: jax.lax.with_sharding_constraint(c, shardings[name]) for name, c in layer.items()}
                for layer in cache]

    def _sample(self, params, labels, key, settings: SamplingSettings):
        self.num_traces += 1  # Python side effect: runs once per trace, never per call
        cfg = self.cfg
        batch, g, c = labels.shape[0], cfg.group_size, cfg.causal_num
        params = unstack_layers(params, cfg.n_layer)
        apply = functools.partial(self.model.apply, {"params": params})
        select = functools.partial(select_tokens, key=key, settings=settings, num_groups=cfg.num_groups,
                                   group_size=g, causal_num=c)
        double = (lambda t: jnp.concatenate([t, t])) if settings.guidance else (lambda t: t)

        cond = double(labels)
        if settings.guidance:
            cond = cond.at[batch:].set(cfg.num_classes)  # the null class for the unconditional half
        cls_emb = apply(cond, method=GPT.embed_class)
        special = apply(method=GPT.special_tokens)
        embed = lambda tokens: apply(double(tokens), method=GPT.embed_tokens)  # noqa: E731
        cache = self._constrain_cache(init_cache(cfg, cond.shape[0]))

        def token_step(carry, step):
            cache, prev = carry  # prev: (B, 1), the token of step - 1 (ignored at step 0)
            h = jnp.where(step == 0, cls_emb, embed(prev))
            logits, cache = apply(h, step[None], cache, step, method=GPT.decode)
            tokens = select(logits, step)
            return (self._constrain_cache(cache), tokens), tokens[:, 0]

        (cache, _), first = jax.lax.scan(token_step, (cache, jnp.zeros((batch, 1), jnp.int32)), jnp.arange(c))
        first = first.T  # (B, C)

        def group_step(carry, k):
            cache, prev = carry  # prev: (B, g), the previous group (for k = 0 the last g causal tokens)
            emb = embed(prev)
            first_group = jnp.concatenate(
                [emb[:, -1:], jnp.broadcast_to(special[None], (emb.shape[0], g - 1, cfg.dim))], axis=1)
            h = jnp.where(k == 0, first_group, emb)
            start = c + k * g
            logits, cache = apply(h, start + jnp.arange(g), cache, start, method=GPT.decode)
            tokens = select(logits, c + k)
            return (self._constrain_cache(cache), tokens), tokens

        num_group_steps = (cfg.num_tokens - c) // g
        _, groups = jax.lax.scan(group_step, (cache, first[:, c - g:]), jnp.arange(num_group_steps))
        groups = jnp.transpose(groups, (1, 0, 2)).reshape(batch, num_group_steps * g)
        return jnp.concatenate([first, groups], axis=1)
