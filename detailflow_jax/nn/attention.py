"""Scaled dot-product attention shared by the tokenizer ViTs and the GPT."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """softmax(q k^T / sqrt(d) where mask) v, with the softmax in float32.

    Args:
      q: (B, Lq, H, D); k, v: (B, Lk, H, D).
      mask: boolean, True = may attend, broadcastable to (B, H, Lq, Lk).
    Returns:
      (B, Lq, H, D) in q's dtype.
    """
    scale = q.shape[-1] ** -0.5
    # (B, Lq, H, D) x (B, Lk, H, D) -> (B, H, Lq, Lk)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    # (B, H, Lq, Lk) x (B, Lk, H, D) -> (B, Lq, H, D)
    return jnp.einsum("bhqk,bkhd->bqhd", masked_softmax(logits, mask, v.dtype), v)


def cached_attention(q: jax.Array, k_chunks: Sequence[jax.Array], v_chunks: Sequence[jax.Array],
                     mask: jax.Array) -> jax.Array:
    """`dot_product_attention` of new queries against a KV cache held as consecutive chunks of key
    positions.

    Args:
      q: (B, S, H, D) queries.
      k_chunks: (B, H, D, n_i) keys, transposed so that q k^T is a plain (S, D) x (D, n_i) product
        per (b, h).
      v_chunks: (B, H, n_i, D) values.
      mask: boolean, broadcastable to (B, H, S, sum n_i).
    Returns:
      (B, S, H, D) in q's dtype.

    One softmax runs over the keys of all chunks, so the result is that of attending to their
    concatenation; a caller passes only the chunks its queries can see. Every operand has (b, h) as
    its leading batch dims, so XLA runs the matmuls on the cache as it lies in memory (a
    mixed-layout einsum made XLA:CPU transpose the whole cache at every step).
    """
    q = jnp.swapaxes(q, 1, 2)  # (B, S, H, D) -> (B, H, S, D)
    scale = q.shape[-1] ** -0.5
    # (B, H, S, D) x (B, H, D, n_i) -> (B, H, S, n_i), concatenated to (B, H, S, sum n_i)
    logits = jnp.concatenate(
        [jnp.einsum("bhqd,bhdk->bhqk", q, k, preferred_element_type=jnp.float32) for k in k_chunks],
        axis=-1,
    )
    weights = masked_softmax(logits * scale, mask, v_chunks[0].dtype)
    bounds = np.cumsum([v.shape[2] for v in v_chunks])[:-1]
    # (B, H, S, n_i) x (B, H, n_i, D) -> (B, H, S, D), summed over the chunks
    out = sum(
        jnp.einsum("bhqk,bhkd->bhqd", w, v)
        for w, v in zip(jnp.split(weights, bounds, axis=-1), v_chunks)
    )
    return jnp.swapaxes(out, 1, 2)  # (B, H, S, D) -> (B, S, H, D)


def masked_softmax(logits: jax.Array, mask: jax.Array | None, dtype) -> jax.Array:
    """float32 softmax over the last axis where `mask`; a masked key gets exactly zero weight (as
    PyTorch's additive finfo.min mask)."""
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1).astype(dtype)
