"""Sampled tokens -> images through the DetailFlow tokenizer, with coarse-to-fine previews
(official `VQModel.decode_code`; docs/model.md#sampling-steps).

A prefix of t tokens decodes at the canvas `ResolutionTables.canvas[t]`, so previews for increasing
t show the image sharpening as groups arrive. Pixels are converted as the official sampler does
(``detailflow_jax.pixels``); the pictures made of them are ``detailflow_jax.inference.pictures``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax.pixels import to_uint8
from detailflow_jax.tokenizer.model import DetailFlowTokenizer
from detailflow_jax.tokenizer.resolution import ResolutionTables


class TokenDecoder:
    """Decodes token sequences (B, N) with a tokenizer; one compiled function per canvas (t is
    traced: every prefix length decoding at one canvas shares it)."""

    def __init__(self, tokenizer_config: Any, tokenizer_params: Any):
        self.model = DetailFlowTokenizer(tokenizer_config)
        cfg = self.model.cfg
        self.params = tokenizer_params
        self.tables = ResolutionTables.from_model_config(cfg)

    @functools.partial(jax.jit, static_argnums=(0, 4))
    def _decode(self, params, codes, t, canvas):
        return self.model.apply({"params": params}, codes, t=t, canvas=canvas, method="decode_code")

    def decode(self, codes, t: int | None = None) -> jax.Array:
        """(B, N) codes -> (B, canvas, canvas, 3) float images from the first t tokens (default all
        N)."""
        t = self.tables.num_tokens if t is None else int(t)
        if t not in self.tables.canvas:
            raise ValueError(
                f"t={t} is not an admissible token count; choose one of {self.tables.token_counts}"
            )
        return self._decode(
            self.params, jnp.asarray(codes, jnp.int32), jnp.int32(t), self.tables.canvas[t]
        )

    def previews(self, codes, counts: Sequence[int] | None = None) -> list[tuple[int, np.ndarray]]:
        """Coarse-to-fine: [(t, uint8 images (B, canvas_t, canvas_t, 3))] for increasing t (default:
        every admissible t)."""
        counts = self.tables.token_counts if counts is None else sorted(int(t) for t in counts)
        return [(t, np.asarray(to_uint8(self.decode(codes, t)))) for t in counts]
