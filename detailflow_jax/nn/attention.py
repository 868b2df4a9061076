"""Scaled dot-product attention shared by the tokenizer ViTs and the GPT."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(d) where mask) v, with the softmax in float32.

    Args:
      q: (B, Lq, H, D); k, v: (B, Lk, H, D).
      mask: boolean, True = may attend, broadcastable to (B, H, Lq, Lk).
    Returns:
      (B, Lq, H, D) in q's dtype.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    return jnp.einsum("bhqk,bkhd->bqhd", masked_softmax(logits, mask, v.dtype), v)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array) -> jax.Array:
    """`dot_product_attention` of new queries against a KV cache laid out for CPU/GPU batched matmuls.

    Args:
      q: (B, S, H, D) queries.
      k_cache: (B, H, D, N) keys, transposed so that q k^T is a plain (S, D) x (D, N) product per (b, h).
      v_cache: (B, H, N, D) values.
      mask: boolean, broadcastable to (B, H, S, N).
    Returns:
      (B, S, H, D) in q's dtype.

    Every operand has (b, h) as its leading batch dims, so XLA runs both matmuls on the cache as it lies in memory;
    the mixed-layout einsum of `dot_product_attention` made XLA:CPU transpose the whole cache at every step.
    """
    q = jnp.swapaxes(q, 1, 2)
    logits = jnp.einsum("bhqd,bhdk->bhqk", q, k_cache, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    out = jnp.einsum("bhqk,bhkd->bhqd", masked_softmax(logits, mask, v_cache.dtype), v_cache)
    return jnp.swapaxes(out, 1, 2)


def masked_softmax(logits: jax.Array, mask: jax.Array | None, dtype) -> jax.Array:
    """float32 softmax over the last axis where `mask`; a masked key gets exactly zero weight (as PyTorch's
    additive finfo.min mask)."""
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1).astype(dtype)
