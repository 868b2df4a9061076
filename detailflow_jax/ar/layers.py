"""LlamaGen building blocks: RMSNorm (fp32) and the SwiGLU feed-forward."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detailflow_jax.sharding import HIDDEN, constrain

# Official `_init_weights`: every Linear and Embedding ~ N(0, 0.02).
DEFAULT_INIT = nn.initializers.normal(stddev=0.02)


def swiglu_hidden_dim(dim: int, multiple_of: int) -> int:
    """LlamaGen `FeedForward`: int(2/3 * 4 * dim) rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    return hidden if hidden % multiple_of == 0 else hidden + multiple_of - hidden % multiple_of


class RMSNorm(nn.Module, kw_only=True):
    """x / rms(x) * scale, normalised in float32 (eps 1e-5), result in the input dtype."""
    eps: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = (
            x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        ).astype(x.dtype)
        return normed * scale.astype(x.dtype)


class SwiGLU(nn.Module, kw_only=True):
    """w2(silu(w1 x) * w3 x) followed by dropout (official `FeedForward`).

    ``train`` turns the dropout on: a field, not a call argument, so that a rematerialised block
    needs no static arguments."""
    hidden_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def dense(features, names, name):
            return nn.Dense(
                features,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(DEFAULT_INIT, names),
                name=name,
            )

        gate = dense(self.hidden_dim, ("embed", "mlp"), "w1")(x)  # (B, L, D) -> (B, L, F)
        h = constrain(nn.silu(gate) * dense(self.hidden_dim, ("embed", "mlp"), "w3")(x), HIDDEN)
        out = dense(x.shape[-1], ("mlp", "embed"), "w2")(h)  # (B, L, F) -> (B, L, D)
        return nn.Dropout(rate=self.dropout, deterministic=not self.train)(out)
