"""PatchGAN discriminator (pix2pix / taming-transformers ``NLayerDiscriminator``), trained from
scratch.

For runs without the pretrained DINO weights. Layout with ``ndf`` = 64, ``n_layers`` = 3 (2.77M
parameters):

    conv4x4/2 (bias) -> LReLU(0.2)
    [conv4x4/2 (no bias) -> BN -> LReLU(0.2)] x (n_layers - 1)     channels ndf * min(2^n, 8)
    conv4x4/1 (no bias) -> BN -> LReLU(0.2)                          channels ndf * min(2^n_layers, 8)
    conv4x4/1 (bias) -> 1 channel

All convs pad 1. A 256² input gives 30x30 patch logits; ``__call__`` returns them flattened to (B,
P). Init as taming's ``weights_init``: conv kernels N(0, 0.02), BN scale N(1, 0.02), biases 0.
BatchNorm uses the statistics of the whole batch in train mode: under ``jit`` with a globally
sharded batch the reduction is already global, so no ``axis_name`` is needed. Parameters are
replicated (small).
"""  # noqa: E501

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class PatchGANDiscriminator(nn.Module):
    """``D(x, train)`` for NHWC images in [-1, 1] -> (B, P) patch logits (float32)."""

    ndf: int = 64
    n_layers: int = 3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _conv(self, features: int, stride: int, use_bias: bool, name: str) -> nn.Conv:
        return nn.Conv(
            features,
            (4, 4),
            strides=stride,
            padding=((1, 1), (1, 1)),
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None,) * 4),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
        )

    def _norm(self, train: bool, name: str) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            use_fast_variance=False,
            name=name,
            scale_init=nn.with_logical_partitioning(_scale_init, (None,)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True,
                 sample_mask: jax.Array | None = None) -> jax.Array:
        """``sample_mask`` (B,) bool: only those samples enter train-mode BatchNorm statistics."""
        if self.n_layers < 1:
            raise ValueError(f"PatchGAN n_layers must be >= 1, got {self.n_layers}")
        h = nn.leaky_relu(self._conv(self.ndf, 2, True, "conv_0")(x.astype(self.dtype)), 0.2)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            h = self._conv(self.ndf * min(2**n, 8), stride, False, f"conv_{n}")(h)
            mask = None if sample_mask is None else sample_mask[:, None, None, None]
            h = nn.leaky_relu(self._norm(train, f"norm_{n}")(h, mask=mask), 0.2).astype(self.dtype)
        logits = self._conv(1, 1, True, f"conv_{self.n_layers + 1}")(h)
        return logits.astype(jnp.float32).reshape(x.shape[0], -1)
