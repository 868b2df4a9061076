"""2D rotary position embedding over (group row, slot column), exactly as the official
`precompute_freqs_cis_2d_nonsquare` / `apply_rotary_emb` (docs/model.md#2d-rope).

Table row 0 is the class token and is all zeros (its q and k become zero). Sequence position p >= 1
uses grid cell p - 1, i.e. row (p - 1) // g and column (p - 1) % g: the RoPE grid is shifted by one
relative to the mask groups. Within a head the first half of the rotation pairs turns with the row,
the second half with the column; pairs are adjacent elements (x[2m], x[2m + 1]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_table_2d(num_rows: int, num_cols: int, head_dim: int, base: float = 10000.0,
                  cls_token_num: int = 1) -> np.ndarray:
    """(cls_token_num + rows * cols, head_dim // 2, 2) table of (cos, sin), float32 like the
    official one."""
    if head_dim % 4:
        raise ValueError(
            f"2D RoPE needs head_dim divisible by 4 (two halves of rotation pairs), got {head_dim}"
        )
    half = head_dim // 2
    # float32 throughout, mirroring torch's default dtype, so the table matches bit for bit up to
    # libm rounding.
    freqs = 1.0 / (
        np.float32(base)
        ** (np.arange(0, half, 2, dtype=np.float32)[: half // 2] / np.float32(half))
    )
    freqs = freqs.astype(np.float32)
    rows = np.outer(np.arange(num_rows, dtype=np.float32), freqs)   # (rows, half // 2)
    cols = np.outer(np.arange(num_cols, dtype=np.float32), freqs)   # (cols, half // 2)
    grid = np.concatenate(
        [
            np.broadcast_to(rows[:, None, :], (num_rows, num_cols, half // 2)),
            np.broadcast_to(cols[None, :, :], (num_rows, num_cols, half // 2)),
        ],
        axis=-1,
    )
    table = np.stack([np.cos(grid), np.sin(grid)], axis=-1).reshape(num_rows * num_cols, half, 2)
    return np.concatenate(
        [np.zeros((cls_token_num, half, 2), np.float32), table.astype(np.float32)]
    )


def apply_rope(x: jax.Array, table: jax.Array) -> jax.Array:
    """Rotates adjacent pairs of x (B, L, H, D) by table (L, D // 2, 2); computed in float32,
    returned in x.dtype."""
    xs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    out = jnp.stack(
        [xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], axis=-1
    )
    return out.reshape(x.shape).astype(x.dtype)
