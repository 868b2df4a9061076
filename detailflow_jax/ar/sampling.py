"""The KV-cache group-parallel sampler: one jitted function (params, labels, key, settings) ->
tokens (B, N).

The steps of the official `generate_group_par` (docs/model.md#sampling-steps), as two ``lax.scan``
loops: C token-causal steps writing one cache slot each, then (N - C) / g group steps writing g
slots with ``dynamic_update_slice`` and sampling g tokens independently (23 / 39 / 71 forward passes
for N = 128 / 256 / 512). CFG is one doubled [cond; null] batch. The cache is an explicit pytree
(`init_cache`) because Linen's ``decode=True`` cache takes one token per call; each layer writes its
slots in place, so a step reads the weights and the visible cache once and copies nothing else.

The cache is split into ``cache_chunks`` chunks of key positions; the steps whose slots fall in
chunk i run as one scan that attends to chunks 0..i only, so attention reads about half of the cache
on average (what matters for long N and large batches), at the price of one compiled loop body per
chunk. Stacked ``scan_layers`` weights are split, and weights cast to the dtypes they run in, once
per call before the loops (`decoding_params`): doing it inside a step would copy every layer's
weights at every step.
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
from detailflow_jax.ar.model import (
    CACHE_AXES,
    GPT,
    GPTConfig,
    decoding_params,
    init_cache,
    unrolled,
)

__all__ = ["Sampler", "SamplingSettings", "default_cache_chunks"]

# Each chunk adds a compiled loop body (~1 s for GPT-B). GPT-B, N = 512, CPU: 4 chunks of 128 took
# 9% less time per image than 1 chunk; 8 chunks of 64 saved only 2% more for twice the compile time.
MIN_CHUNK_LEN = 128
MAX_CHUNKS = 8


def default_cache_chunks(cfg: GPTConfig) -> int:
    """The most chunks (at most MAX_CHUNKS) that split N into equal multiples of g of at least
    MIN_CHUNK_LEN."""
    for chunks in range(MAX_CHUNKS, 1, -1):
        n = cfg.num_tokens // chunks
        if n * chunks == cfg.num_tokens and n % cfg.group_size == 0 and n >= MIN_CHUNK_LEN:
            return chunks
    return 1


def _runs_by_chunk(first_slots: list[int], chunk_len: int) -> list[tuple[int, int, int]]:
    """Consecutive steps grouped by the cache chunk their first written slot lies in: [(chunk,
    start, stop)]."""
    runs = []
    for step, slot in enumerate(first_slots):
        chunk = slot // chunk_len
        if runs and runs[-1][0] == chunk:
            runs[-1] = (chunk, runs[-1][1], step + 1)
        else:
            runs.append((chunk, step, step + 1))
    return runs


class Sampler:
    """Jitted cached sampler for one model. Same shapes and static settings never retrace
    (``num_traces``).

    Args:
      model: the GPT module.
      mesh: optional mesh; the batch (labels in, tokens out, KV cache) is then sharded over its data
        axes.
      param_shardings: NamedSharding tree (or prefix) of the params on ``mesh``; default replicated.
      cache_chunks: chunks of the KV cache (see the module docstring); default
        `default_cache_chunks`. The tokens do not depend on it.
      loop_unroll: {loop index in `loop_runs`: unroll factor} (default 1 each). The tokens do not
        depend on it; the preflight unrolls one loop at a time to measure one of its iterations.
    """

    def __init__(
        self,
        model: GPT,
        mesh: Mesh | None = None,
        param_shardings: Any = None,
        rules=shd.DEFAULT_RULES,
        cache_chunks: int | None = None,
        loop_unroll: dict | None = None,
    ):
        self.model = GPT(unrolled(model.cfg))
        self.cfg = model.cfg
        self.cache_chunks = (
            default_cache_chunks(model.cfg) if cache_chunks is None else cache_chunks
        )
        # checks the chunking, allocates nothing
        jax.eval_shape(lambda: init_cache(model.cfg, 1, self.cache_chunks))
        self.mesh = mesh
        self.rules = rules
        self.loop_unroll = dict(loop_unroll or {})
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

    @property
    def jitted(self):
        """The jitted (params, labels, key, settings) -> tokens that ``__call__`` runs (for
        ahead-of-time compilation)."""
        return self._jitted

    def loop_runs(self) -> list[tuple[int, bool, int, int]]:
        """The sampling loops, one ``lax.scan`` each: (cache chunk, group steps?, first step, stop).
        Token steps count s = 0 .. C - 1, group steps k = 0 .. (N - C) / g - 1."""
        cfg = self.cfg
        c, g, chunk_len = cfg.causal_num, cfg.group_size, cfg.num_tokens // self.cache_chunks
        group_slots = [c + k * g for k in range((cfg.num_tokens - c) // g)]
        return [
            (chunk, False, start, stop)
            for chunk, start, stop in _runs_by_chunk(list(range(c)), chunk_len)
        ] + [
            (chunk, True, start, stop)
            for chunk, start, stop in _runs_by_chunk(group_slots, chunk_len)
        ]

    def __call__(
        self, params: Any, labels, key: jax.Array, settings: SamplingSettings | None = None
    ) -> jax.Array:
        settings = SamplingSettings() if settings is None else settings.check()
        labels = jnp.asarray(labels, jnp.int32)
        if labels.ndim != 1:
            raise ValueError(f"labels must be a (B,) vector of class ids, got shape {labels.shape}")
        if self.mesh is not None:
            data = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            if labels.shape[0] % data:
                raise ValueError(
                    f"batch {labels.shape[0]} is not divisible by the {data} devices of the mesh's "
                    "data "
                    "axes (data x fsdp); pad the labels or change the mesh"
                )
        return self._jitted(params, labels, key, settings)

    # ---- the traced program ----------------------------------------------------------------------

    def _constrain_cache(self, cache):
        if self.mesh is None:
            return cache
        shardings = {name: nn.logical_to_mesh_sharding(P(*axes), self.mesh, self.rules)
                     for name, axes in CACHE_AXES.items()}
        return [{name: [jax.lax.with_sharding_constraint(c, shardings[name]) for c in chunks]
                 for name, chunks in layer.items()} for layer in cache]

    def _sample(self, params, labels, key, settings: SamplingSettings):
        self.num_traces += 1  # Python side effect: runs once per trace, never per call
        cfg = self.cfg
        batch, g, c = labels.shape[0], cfg.group_size, cfg.causal_num
        params = decoding_params(params, cfg)  # once per call, outside the loops
        apply = functools.partial(self.model.apply, {"params": params})
        select = functools.partial(
            select_tokens,
            key=key,
            settings=settings,
            num_groups=cfg.num_groups,
            group_size=g,
            causal_num=c,
        )
        double = (lambda t: jnp.concatenate([t, t])) if settings.guidance else (lambda t: t)

        cond = double(labels)
        if settings.guidance:
            cond = cond.at[batch:].set(cfg.num_classes)  # the null class for the unconditional half
        cls_emb = apply(cond, method=GPT.embed_class)
        special = apply(method=GPT.special_tokens)
        embed = lambda tokens: apply(double(tokens), method=GPT.embed_tokens)  # noqa: E731
        cache = self._constrain_cache(init_cache(cfg, cond.shape[0], self.cache_chunks))

        def token_step(chunk, carry, step):
            cache, prev = carry  # prev: (B, 1), the token of step - 1 (ignored at step 0)
            h = jnp.where(step == 0, cls_emb, embed(prev))
            logits, cache = apply(h, step[None], cache, step, chunk, method=GPT.decode)
            tokens = select(logits, step)
            return (self._constrain_cache(cache), tokens), tokens[:, 0]

        def group_step(chunk, carry, k):
            # prev: (B, g), the previous group (for k = 0 the last g causal tokens)
            cache, prev = carry
            emb = embed(prev)
            first_group = jnp.concatenate(
                [emb[:, -1:], jnp.broadcast_to(special[None], (emb.shape[0], g - 1, cfg.dim))],
                axis=1,
            )
            h = jnp.where(k == 0, first_group, emb)
            start = c + k * g
            logits, cache = apply(h, start + jnp.arange(g), cache, start, chunk, method=GPT.decode)
            tokens = select(logits, c + k)
            return (self._constrain_cache(cache), tokens), tokens

        # One scan per run of steps that write the same chunk (one run each when the cache is one
        # chunk).
        runs = list(enumerate(self.loop_runs()))

        def loop(i, step_fn, carry, chunk, start, stop):
            return jax.lax.scan(functools.partial(step_fn, chunk), carry, jnp.arange(start, stop),
                                unroll=self.loop_unroll.get(i, 1))

        carry, first = (cache, jnp.zeros((batch, 1), jnp.int32)), []
        for i, (chunk, _, start, stop) in [r for r in runs if not r[1][1]]:
            carry, out = loop(i, token_step, carry, chunk, start, stop)
            first.append(out.T)
        first = jnp.concatenate(first, axis=1)  # (B, C)

        carry, groups = (carry[0], first[:, c - g:]), []
        for i, (chunk, _, start, stop) in [r for r in runs if r[1][1]]:
            carry, out = loop(i, group_step, carry, chunk, start, stop)
            groups.append(jnp.transpose(out, (1, 0, 2)).reshape(batch, (stop - start) * g))
        return jnp.concatenate([first, *groups], axis=1)
