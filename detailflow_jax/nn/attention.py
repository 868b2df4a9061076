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
    if mask is not None:
        # Same as PyTorch's additive finfo.min mask: a masked key gets exactly zero weight.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
