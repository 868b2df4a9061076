"""Token count <-> resolution mapping of DetailFlow (official ``ResolutionDegradation``;
docs/model.md#resolution-mapping).

R(t) = R - b (N - t)^alpha with b = (R - 1) / (N - 1)^alpha, so R(1) = 1 and R(N) = R. The first
``causal_num`` prefix lengths are admissible one by one, after that only whole groups.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

Rounding = Literal["ceil", "nearest"]


def admissible_token_counts(num_tokens: int, group_size: int, causal_num: int) -> list[int]:
    """[1, ..., C] followed by the group ends C + g, C + 2g, ..., N."""
    return list(range(1, causal_num + 1)) + list(
        range(causal_num + group_size, num_tokens + 1, group_size)
    )


def content_resolution(t: int, image_size: int, num_tokens: int, alpha: float = 1.5) -> int:
    """R(t), truncated to an int and clamped to [1, image_size] exactly as the official code."""
    if num_tokens == 1:
        return image_size
    b = (image_size - 1) / (num_tokens - 1) ** alpha
    s = int(image_size - b * (num_tokens - t) ** alpha)
    return min(max(s, 1), image_size)


def canvas_size(s: int, image_size: int, patch_size: int = 16, min_canvas: int = 16,
                rounding: Rounding = "ceil") -> int:
    """Decoder canvas for content size ``s``: a multiple of the patch size, at least ``min_canvas``.

    ``ceil`` is the official code (``smart_resize`` with math.ceil); ``nearest`` is the paper's
    wording.
    """
    if rounding == "ceil":
        c = patch_size * math.ceil(s / patch_size)
    elif rounding == "nearest":
        c = patch_size * math.floor(s / patch_size + 0.5)
    else:
        raise ValueError(f"rounding={rounding!r}: use 'ceil' (official code) or 'nearest' (paper)")
    return max(min(c, image_size), min_canvas, patch_size)


@dataclasses.dataclass(frozen=True)
class ResolutionTables:
    """The official ``token2res``, ``token2dec_out_res`` and ``decres2besttoken`` tables for one
    setting."""

    image_size: int
    num_tokens: int
    group_size: int
    causal_num: int
    patch_size: int = 16
    alpha: float = 1.5
    min_canvas: int | None = None  # None: one patch (16 in the official code)
    rounding: Rounding = "ceil"

    @property
    def token_counts(self) -> list[int]:
        return admissible_token_counts(self.num_tokens, self.group_size, self.causal_num)

    @property
    def content_res(self) -> dict[int, int]:
        """token2res: t -> content resolution R(t)."""
        return {
            t: content_resolution(t, self.image_size, self.num_tokens, self.alpha)
            for t in self.token_counts
        }

    @property
    def canvas(self) -> dict[int, int]:
        """token2dec_out_res: t -> decoder canvas."""
        min_canvas = self.patch_size if self.min_canvas is None else self.min_canvas
        return {t: canvas_size(s, self.image_size, self.patch_size, min_canvas, self.rounding)
                for t, s in self.content_res.items()}

    @property
    def canvas_sizes(self) -> list[int]:
        """Distinct decoder canvases, ascending (one compiled train step each)."""
        return sorted(set(self.canvas.values()))

    @property
    def best_token(self) -> dict[int, int]:
        """decres2besttoken: canvas -> the t decoding at that canvas whose R(t) is closest (ties:
        larger t)."""
        best: dict[int, int] = {}
        res = self.content_res
        for t, c in self.canvas.items():
            if c not in best or abs(res[t] - c) <= abs(res[best[c]] - c):
                best[c] = t
        return dict(sorted(best.items()))

    @classmethod
    def from_model_config(cls, cfg, rounding: Rounding = "ceil") -> "ResolutionTables":
        return cls(
            image_size=cfg.image_size,
            num_tokens=cfg.num_latent_tokens,
            group_size=cfg.group_size,
            causal_num=cfg.causal_num,
            patch_size=cfg.patch_size,
            rounding=rounding,
        )
