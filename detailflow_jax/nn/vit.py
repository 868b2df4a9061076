"""Pre-LN ViT blocks in the SigLIP2 layout (shared by the tokenizer encoder/decoder and the DINO
discriminator).

Layout and parameter names follow HF ``SiglipEncoderLayer`` so PyTorch checkpoints map one-to-one:

    x = x + out_proj(attn(q_proj(LN1(x)), k_proj(.), v_proj(.)))      layer_norm1, q/k/v/out_proj (all biased)
    x = x + fc2(gelu_tanh(fc1(LN2(x))))                                 layer_norm2, fc1, fc2

Parameter paths of one block: ``layer_norm1/{scale,bias}``,
``self_attn/{q_proj,k_proj,v_proj,out_proj}/{kernel,bias}``, ``layer_norm2/{scale,bias}``,
``mlp/{fc1,fc2}/{kernel,bias}`` (kernels are [in, out], i.e. torch weights transposed). ``ViTStack``
names its blocks ``layers_0 … layers_{depth-1}`` (not scanned): the stacks here are 12 layers deep,
so compile time is fine, and per-layer names keep weight import and partial loading (e.g. the first
12 of 27 SigLIP2 layers) trivial.

Logical axes: q/k/v kernels ("embed", "qkv"), out_proj ("qkv", "embed"), fc1 ("embed", "mlp"), fc2
("mlp", "embed"); biases and LayerNorm parameters carry their dimension's name. Activations are
pinned batch-sharded at the block boundaries, heads and hidden units over the tensor axis
(``sharding.constrain``). Norms and the softmax run in float32; the Dense layers compute in
``dtype`` with ``param_dtype`` parameters.
"""  # noqa: E501

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from detailflow_jax.nn.attention import dot_product_attention
from detailflow_jax.sharding import HEADS, HIDDEN, STREAM, constrain

# HF SigLIP init (`Siglip2PreTrainedModel._init_weights`): xavier-uniform projections, zero
# attention biases, N(0, 1e-6) MLP biases.
_XAVIER = nn.initializers.xavier_uniform()
_ZEROS = nn.initializers.zeros_init()
_MLP_BIAS = nn.initializers.normal(stddev=1e-6)


def torch_default_inits(fan_in: int):
    """(kernel_init, bias_init) of a freshly built torch ``nn.Linear``: both U(-1/sqrt(fan_in),
    1/sqrt(fan_in))."""
    bound = fan_in ** -0.5

    def uniform(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return uniform, uniform


def dense(
    features: int,
    names: tuple[str | None, str | None],
    name: str,
    dtype: Any,
    param_dtype: Any,
    kernel_init=_XAVIER,
    bias_init=_ZEROS,
) -> nn.Dense:
    """Biased Dense whose kernel is named ``names`` and whose bias is named after the output
    dimension."""
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(kernel_init, names),
                    bias_init=nn.with_logical_partitioning(bias_init, (names[1],)))


def layer_norm(name: str, eps: float, param_dtype: Any) -> nn.LayerNorm:
    """LayerNorm computed in float32 (its output stays float32)."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(_ZEROS, ("embed",)),
    )


class SelfAttention(nn.Module, kw_only=True):
    """Multi-head self-attention with separate biased q/k/v/out projections (scale
    head_dim^-0.5)."""

    width: int
    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
                 kv: jax.Array | None = None) -> jax.Array:
        """Queries from x (B, Lq, width), keys and values from ``kv`` (B, Lk, width; default x)."""
        if self.width % self.heads:
            raise ValueError(f"attention width {self.width} is not divisible by heads {self.heads}")
        kv = x if kv is None else kv
        head_dim = self.width // self.heads

        def project(name, source):
            y = dense(self.width, ("embed", "qkv"), name, self.dtype, self.param_dtype)(source)
            # (B, L, width) -> (B, L, heads, head_dim)
            return constrain(y.reshape(*source.shape[:2], self.heads, head_dim), HEADS)

        # (B, Lq, heads, head_dim) x (B, Lk, heads, head_dim) -> (B, Lq, heads, head_dim)
        out = dot_product_attention(
            project("q_proj", x), project("k_proj", kv), project("v_proj", kv), mask
        )
        out = constrain(out, HEADS).reshape(*x.shape[:2], self.width)  # -> (B, Lq, width)
        return constrain(
            dense(self.width, ("qkv", "embed"), "out_proj", self.dtype, self.param_dtype)(out),
            STREAM,
        )


class MLP(nn.Module, kw_only=True):
    """fc1 -> tanh-approximate GELU (``gelu_pytorch_tanh``) -> fc2."""

    width: int
    mlp_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(
            self.mlp_dim, ("embed", "mlp"), "fc1", self.dtype, self.param_dtype, bias_init=_MLP_BIAS
        )(x)
        h = constrain(jax.nn.gelu(h, approximate=True), HIDDEN)
        out = dense(
            self.width, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype, bias_init=_MLP_BIAS
        )(h)
        return constrain(out, STREAM)


class ViTBlock(nn.Module, kw_only=True):
    """One pre-LN transformer block: x += Attn(LN1(x)); x += MLP(LN2(x)).

    Call with ``(x, mask)``: x (B, L, width); mask boolean (True = may attend) broadcastable to (B,
    heads, L, L), or None for full attention. The residual stream keeps x's dtype (float32 in
    practice).

    Two ways to compute only the rows that are needed, with the same result for those rows:
    ``context`` (B, Lc, width): rows placed before x that are attended to but not updated (their
    states at this block's input, e.g. from another pass whose rows never attend to x); the mask
    then covers [context | x]. ``rows`` = (start, stop): only those rows of x are updated and
    returned; the others are keys and values only (the last block of a stack whose output keeps some
    rows). The mask keeps its full row count.
    """

    width: int
    heads: int
    mlp_dim: int
    ln_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    rows: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
                 context: jax.Array | None = None) -> jax.Array:
        x = constrain(x, STREAM)
        offset = 0
        if context is not None:
            offset = context.shape[1]
            x = jnp.concatenate([constrain(context, STREAM).astype(x.dtype), x], axis=1)
        start, stop = (0, x.shape[1] - offset) if self.rows is None else self.rows
        start, stop = start + offset, stop + offset
        if mask is not None and mask.shape[-2] != 1:
            mask = mask[..., start:stop, :]
        h = layer_norm("layer_norm1", self.ln_eps, self.param_dtype)(x).astype(self.dtype)
        attn = SelfAttention(width=self.width, heads=self.heads, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="self_attn")
        x = x[:, start:stop]
        x = x + attn(h[:, start:stop], mask, kv=h).astype(x.dtype)
        h = layer_norm("layer_norm2", self.ln_eps, self.param_dtype)(x).astype(self.dtype)
        mlp = MLP(width=self.width, mlp_dim=self.mlp_dim, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="mlp")
        h = mlp(h)
        return constrain(x + h.astype(x.dtype), STREAM)


class ViTStack(nn.Module, kw_only=True):
    """``depth`` ViTBlocks named ``layers_0 … layers_{depth-1}``, all with the same mask.

    ``remat=True`` recomputes each block's activations in the backward pass (saves memory for
    training at 256²). ``keep_rows`` = (start, stop): the rows of the output that are used; the last
    block computes only those. ``contexts``: one (B, Lc, width) array per block, the states of rows
    placed before x that every block attends to without updating (``ViTBlock``'s ``context``).
    ``return_inputs``: also return each block's input.
    """

    depth: int
    width: int
    heads: int
    mlp_dim: int
    ln_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    keep_rows: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
                 contexts: Sequence[jax.Array] | None = None,
                 return_inputs: bool = False) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        block_cls = nn.remat(ViTBlock) if self.remat else ViTBlock
        inputs = []
        for i in range(self.depth):
            inputs.append(x)
            rows = self.keep_rows if i == self.depth - 1 else None
            block = block_cls(width=self.width, heads=self.heads, mlp_dim=self.mlp_dim,
                              ln_eps=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                              rows=rows, name=f"layers_{i}")
            x = block(x, mask, context=None if contexts is None else contexts[i])
        return (x, inputs) if return_inputs else x
