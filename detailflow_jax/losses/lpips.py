"""LPIPS-VGG16 perceptual distance (taming-transformers / DetailFlow ``modelling/lpips/lpips.py``).

    d(x, y) = sum_l mean_hw( w_l . (n(f_l(s(x))) - n(f_l(s(y))))^2 )

s = the fixed scaling layer on [-1, 1] inputs, f_l = VGG16 activations at relu1_2 … relu5_3, n =
channel normalisation x / (||x||_2 + 1e-10), w_l = the 1x1 "lin" heads (no bias). Inputs are NHWC;
the result is per sample (B,) — the training loss takes its mean. Weights: ``python -m
detailflow_jax.convert.lpips``.

With ``train=True`` each head's input (the squared differences) first goes through
Dropout(``dropout_rate``), as the official ``NetLinLayer(use_dropout=True)`` does while the loss
module is in train mode: pass ``rngs={"dropout": key}``. ``dropout_rate=0`` turns it off;
``train=False`` is the deterministic LPIPS.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detailflow_jax.losses.vgg import TAPS, VGG16_BLOCKS, VGG16Features
from detailflow_jax.losses.weights import load_required_params

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
WEIGHTS_FLAG = "--config.losses.lpips_weights"
CONVERTER = "detailflow_jax.convert.lpips"


def channel_normalize(f: jax.Array) -> jax.Array:
    """f / (||f||_2 over channels + 1e-10), in float32.

    The square root is taken of max(sum, tiny) where the sum is 0 so that an all-zero ReLU pixel
    gets a zero gradient instead of NaN (PyTorch's 0 * inf); the value is unchanged.
    """
    f = f.astype(jnp.float32)
    sq = jnp.sum(f * f, axis=-1, keepdims=True)
    norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
    return f / (norm + NORM_EPS)


class LPIPS(nn.Module):
    """``LPIPS()(x, y, train)`` -> (B,) distances between NHWC batches in [-1, 1] (size >= 16)."""

    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, train: bool = False) -> jax.Array:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs must have the same shape, got {x.shape} and {y.shape}")
        b = x.shape[0]
        both = (jnp.concatenate([x, y]).astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(
            SCALE
        )
        feats = VGG16Features(self.dtype, self.param_dtype, name="vgg")(both)
        total = jnp.zeros((b,), jnp.float32)
        for k, (tap, (_, _, channels)) in enumerate(zip(TAPS, VGG16_BLOCKS)):
            f = channel_normalize(feats[tap])
            diff = nn.Dropout(self.dropout_rate, deterministic=not train)((f[:b] - f[b:]) ** 2)
            w = self.param(
                f"lin{k}",
                nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
                (channels,),
                self.param_dtype,
            )
            total = total + jnp.mean(jnp.sum(diff * w.astype(jnp.float32), axis=-1), axis=(1, 2))
        return total


def load_lpips_params(path) -> dict:
    """The converted LPIPS parameters at ``path`` (``{"params": …}`` for ``LPIPS().apply``), or a
    clear error."""
    return {"params": load_required_params("perceptual loss LPIPS", path, WEIGHTS_FLAG, CONVERTER)}
