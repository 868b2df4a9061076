"""Patchify / unpatchify in the official orders and the resized image position table (NHWC
images)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, (H/p)·(W/p), p·p·C), raster patch order, each patch flattened as (row,
    col, channel).

    This is `convert_image_to_patches` (HF SigLIP2 NaFlex order), so the pretrained Linear patch
    embedding applies.
    """
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: jax.Array, patch: int, channels: int = 3) -> jax.Array:
    """(B, h·h, p·p·C) -> (B, h·p, h·p, C); inverse of `patchify` (official `ToPixel.unpatchify`,
    square only)."""
    b, length, _ = tokens.shape
    grid = int(round(length ** 0.5))
    if grid * grid != length:
        raise ValueError(f"{length} patch tokens do not form a square grid")
    x = tokens.reshape(b, grid, grid, patch, patch, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # official einsum 'nhwpqc->nchpwq', written channel-last
    return x.reshape(b, grid * patch, grid * patch, channels)


def resized_position_table(table: jax.Array, grid: int) -> jax.Array:
    """(G·G, D) learned table -> (grid·grid, D) for a grid×grid patch layout.

    Matches torch `F.interpolate(bilinear, align_corners=False, antialias=True)`
    (docs/model.md#encoder); at grid == G the table is used as is.
    """
    size = int(round(table.shape[0] ** 0.5))
    if grid == size:
        return table
    square = table.reshape(size, size, table.shape[-1]).astype(jnp.float32)
    resized = jax.image.resize(
        square, (grid, grid, table.shape[-1]), method="linear", antialias=True
    )
    return resized.reshape(grid * grid, table.shape[-1]).astype(table.dtype)
