"""The convolution stack of torchvision's VGG16 (``features[0:30]``), returning the five LPIPS taps.

Layer names ``conv{block}_{i}`` follow the VGG paper; ``TORCHVISION_INDEX`` maps each to its index
in torchvision's ``vgg16().features`` (used by the weight converter). Parameters are replicated
(14.7M, frozen).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# (block, convs per block, channels); a 2x2 max-pool precedes every block but the first.
VGG16_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


def _torchvision_indices() -> dict[str, int]:
    """conv name -> index in ``vgg16().features`` (conv, relu pairs, plus one max-pool between
    blocks)."""
    out, idx = {}, 0
    for b, n, _ in VGG16_BLOCKS:
        if b > 1:
            idx += 1  # max-pool
        for i in range(n):
            out[f"conv{b}_{i + 1}"] = idx
            idx += 2  # conv, relu
    return out


TORCHVISION_INDEX = _torchvision_indices()


class VGG16Features(nn.Module):
    """NHWC images (already normalised) -> {tap name: (B, h, w, C) float32 activation}."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        feats = {}
        h = x.astype(self.dtype)
        for b, n, channels in VGG16_BLOCKS:
            if b > 1:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for i in range(n):
                h = nn.Conv(
                    channels,
                    (3, 3),
                    padding=1,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), (None, None, None, None)
                    ),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
                    name=f"conv{b}_{i + 1}",
                )(h)
                h = nn.relu(h)
            feats[f"relu{b}_{n}"] = h.astype(jnp.float32)
        return feats
