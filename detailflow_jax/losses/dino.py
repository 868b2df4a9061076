"""Frozen DINO ViT-S/16 feature extractor of the DINO discriminator (official / VAR
``FrozenDINOSmallNoDrop``).

``dino_preprocess`` brings [-1, 1] NHWC images to ImageNet normalisation at 224² in float32;
``DinoViT`` returns the read-outs ``patch_tokens + cls_token`` (B, 196, 384) after the patch +
position embedding and after blocks ``key_depths`` (2, 5, 8, 11). The blocks are the project's
``ViTBlock`` (timm's fused qkv is split at conversion, its k-bias zeroed). There is no final norm.
Weights: ``python -m detailflow_jax.convert.dino``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax.nn.resample import area_resize, bicubic_resize
from detailflow_jax.nn.vit import ViTBlock

_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)
# [-1, 1] -> ImageNet normalisation as one affine map: x_scale * x + x_shift == ((x + 1) / 2 - mean)
# / std.
X_SCALE = tuple(float(v) for v in 0.5 / _STD)
X_SHIFT = tuple(float(v) for v in (0.5 - _MEAN) / _STD)


def crop_choice(key: jax.Array, h: int, w: int, img_size: int = 224,
                crop_prob: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(crop or resize, top, left) for one batch of h x w images.

    The official draw of every discriminator call (``random.random() <= 0.5``, then ``RandomCrop``);
    a caller passes each call its own key.
    """
    k_coin, k_top, k_left = jax.random.split(key, 3)
    top = jax.random.randint(k_top, (), 0, h - img_size + 1)
    left = jax.random.randint(k_left, (), 0, w - img_size + 1)
    return jax.random.uniform(k_coin) <= crop_prob, top, left


def dino_preprocess(x: jax.Array, img_size: int = 224, crop_key: jax.Array | None = None,
                    crop_prob: float = 0.5, x_scale: Sequence[float] = X_SCALE,
                    x_shift: Sequence[float] = X_SHIFT) -> jax.Array:
    """[-1, 1] NHWC -> ImageNet-normalised (B, img_size, img_size, 3) float32.

    Larger images: with ``crop_key`` given, one random ``img_size`` crop for the whole batch with
    probability ``crop_prob``, else (or without a key) torch 'area' resizing. Smaller or equal
    images: torch 'bicubic'.
    """
    x = x.astype(jnp.float32)
    x = x * jnp.asarray(x_scale, jnp.float32) + jnp.asarray(x_shift, jnp.float32)
    b, h, w, c = x.shape
    if (h, w) == (img_size, img_size):
        return x
    if h > img_size and w > img_size and crop_key is not None:
        use_crop, top, left = crop_choice(crop_key, h, w, img_size, crop_prob)
        crop = jax.lax.dynamic_slice(x, (0, top, left, 0), (b, img_size, img_size, c))
        return jax.lax.cond(use_crop, lambda: crop, lambda: area_resize(x, (img_size, img_size)))
    resize = area_resize if h > img_size else bicubic_resize
    return resize(x, (img_size, img_size))


def readout(h: jax.Array) -> jax.Array:
    """patch tokens + cls token: (B, 1 + L, C) -> (B, L, C)."""
    return h[:, 1:] + h[:, :1]


class DinoViT(nn.Module):
    """Normalised (B, S, S, 3) images -> list of 1 + len(key_depths) read-outs, each (B, (S/patch)²,
    width).

    Parameters: ``patch_embed`` (Conv), ``cls_token`` (1, 1, width), ``pos_embed`` (1, 1 + L, width)
    and ``layers_{i}`` ViTBlocks. Blocks after the last key depth are not built.
    """

    width: int = 384
    heads: int = 6
    mlp_ratio: int = 4
    patch: int = 16
    img_size: int = 224
    key_depths: Sequence[int] = (2, 5, 8, 11)
    ln_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        if x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(
                f"DinoViT expects {self.img_size}² inputs (use dino_preprocess), got {x.shape}"
            )
        grid = self.img_size // self.patch
        h = nn.Conv(
            self.width,
            (self.patch, self.patch),
            strides=self.patch,
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embed",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        )(x.astype(self.dtype))
        h = h.reshape(x.shape[0], grid * grid, self.width).astype(jnp.float32)
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed"))
        cls = self.param("cls_token", init, (1, 1, self.width), self.param_dtype)
        pos = self.param("pos_embed", init, (1, 1 + grid * grid, self.width), self.param_dtype)
        h = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), h], axis=1) + pos
        acts = [readout(h)]
        for i in range(max(self.key_depths) + 1):
            h = ViTBlock(width=self.width, heads=self.heads, mlp_dim=self.mlp_ratio * self.width,
                         ln_eps=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=f"layers_{i}")(h)
            if i in self.key_depths:
                acts.append(readout(h))
        return acts
