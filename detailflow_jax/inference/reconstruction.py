"""Tokenizer reconstruction quality along the coarse-to-fine axis: PSNR from the first t tokens, for
every t."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax import distributed
from detailflow_jax.nn.resample import bicubic_resize
from detailflow_jax.tokenizer.model import DetailFlowTokenizer, corrected_quant
from detailflow_jax.tokenizer.resolution import ResolutionTables


def psnr(reference: jax.Array, image: jax.Array) -> jax.Array:
    """Per-image PSNR in dB of images in [-1, 1] (compared on the [0, 1] scale, reconstructions
    clipped)."""
    ref = (reference.astype(jnp.float32) + 1) / 2
    img = (jnp.clip(image.astype(jnp.float32), -1, 1) + 1) / 2
    mse = jnp.mean((ref - img) ** 2, axis=(1, 2, 3))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


class ReconstructionEvaluator:
    """Encodes once, then decodes from the first t tokens at the canvas of t and scores the result
    after bicubic up-sampling to the full image size (what a viewer of a progressive decode
    sees)."""

    def __init__(self, model_cfg: Any, tables: ResolutionTables | None = None):
        self.model = DetailFlowTokenizer(model_cfg)
        self.tables = tables or ResolutionTables.from_model_config(self.model.cfg)

    @functools.partial(jax.jit, static_argnums=0)
    def encode(self, params, images):
        return self.model.apply({"params": params}, images, method="encode")["quant"]

    @functools.partial(jax.jit, static_argnums=0)
    def encode_noisy(self, params, images, noise_idx, noise_end, rng):
        """quant of the official eval-mode forward with ``noise_idx``: codes [noise_idx, noise_end)
        drawn from each token's top-k nearest, the rest re-encoded after them
        (``DetailFlowTokenizer.self_correct``); the clean quant when noise_idx < 0. The positions
        are traced: one compile serves every noise index."""
        sc = self.model.apply({"params": params}, images, noise_idx, noise_end, rng=rng,
                              method="self_correct")
        return corrected_quant(sc)

    @functools.partial(jax.jit, static_argnums=(0, 4))
    def decode_and_score(self, params, quant, images, canvas, t):
        recon = self.model.apply({"params": params}, quant, t, canvas, method="decode")
        full = images.shape[1]
        if canvas != full:
            recon = bicubic_resize(recon, (full, full))
        return psnr(images, recon), recon

    def reconstruct(self, params, images, t: int) -> jax.Array:
        """(B, R, R, 3) reconstructions from the first t tokens, up-sampled to R."""
        quant = self.encode(params, images)
        return self.decode_and_score(params, quant, images, self.tables.canvas[t], t)[1]

    def psnr_curve(
        self, params, batches: Sequence[jax.Array], counts: Sequence[int] | None = None
    ) -> dict[int, float]:
        """{t: mean PSNR over all images of ``batches``} for every admissible t (or ``counts``)."""
        counts = list(self.tables.token_counts if counts is None else counts)
        totals = {t: [] for t in counts}
        for images in batches:
            quant = self.encode(params, images)
            for t in counts:
                scores = self.decode_and_score(params, quant, images, self.tables.canvas[t], t)[0]
                totals[t].append(distributed.to_host(scores))  # all processes' images
        return {t: float(np.mean(np.concatenate(v))) for t, v in totals.items()}
