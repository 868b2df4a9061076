"""Sampled tokens -> images through the DetailFlow tokenizer, with coarse-to-fine previews
(official `VQModel.decode_code`; docs/model.md#sampling-steps).

A prefix of t tokens decodes at the canvas `ResolutionTables.canvas[t]`, so previews for increasing t show the image
sharpening as groups arrive. Pixels are converted as the official sampler does (``detailflow_jax.pixels``).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from detailflow_jax.pixels import to_uint8
from detailflow_jax.tokenizer.model import DetailFlowTokenizer
from detailflow_jax.tokenizer.resolution import ResolutionTables


class TokenDecoder:
    """Decodes token sequences (B, N) with a tokenizer; one compiled function per (t, canvas)."""

    def __init__(self, tokenizer_config: Any, tokenizer_params: Any):
        self.model = DetailFlowTokenizer(tokenizer_config)
        cfg = self.model.cfg
        self.params = tokenizer_params
        self.tables = ResolutionTables.from_model_config(cfg)

    @functools.partial(jax.jit, static_argnums=(0, 3, 4))
    def _decode(self, params, codes, t, canvas):
        return self.model.apply({"params": params}, codes, t=t, canvas=canvas, method="decode_code")

    def decode(self, codes, t: int | None = None) -> jax.Array:
        """(B, N) codes -> (B, canvas, canvas, 3) float images from the first t tokens (default all N)."""
        t = self.tables.num_tokens if t is None else int(t)
        if t not in self.tables.canvas:
            raise ValueError(f"t={t} is not an admissible token count; choose one of {self.tables.token_counts}")
        return self._decode(self.params, jnp.asarray(codes, jnp.int32), t, self.tables.canvas[t])

    def previews(self, codes, counts: Sequence[int] | None = None) -> list[tuple[int, np.ndarray]]:
        """Coarse-to-fine: [(t, uint8 images (B, canvas_t, canvas_t, 3))] for increasing t (default: every
        admissible t)."""
        counts = self.tables.token_counts if counts is None else sorted(int(t) for t in counts)
        return [(t, np.asarray(to_uint8(self.decode(codes, t)))) for t in counts]


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> Image.Image:
    """uint8 (B, H, W, 3) -> one PIL image with the B images in rows of `columns` (default: one row)."""
    images = np.asarray(images)
    b, h, w, _ = images.shape
    columns = b if columns is None else columns
    rows = -(-b // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return Image.fromarray(grid)


def preview_strip(previews: Sequence[tuple[int, np.ndarray]], size: int | None = None) -> Image.Image:
    """A grid with one row per sample and one column per prefix length t; each preview is upscaled (nearest) to
    `size` (default: the largest canvas) so a row reads coarse -> fine."""
    size = max(p.shape[1] for _, p in previews) if size is None else size
    resized = [np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.NEAREST)) for img in p])
               for _, p in previews]
    stacked = np.stack(resized, axis=1)  # (B, T, size, size, 3)
    b, t = stacked.shape[:2]
    return image_grid(stacked.reshape(b * t, size, size, 3), columns=t)
