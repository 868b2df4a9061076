"""GPT sampling then tokenizer decoding: class labels + a key -> uint8 images, the same on every
process.

The sampling command (``eval/sample.py``), the evaluation and the GPT trainer's sample images all
draw through ``ImageGenerator``; the sampler itself is ``ar/sampling.py`` (jitted scans over token
groups with a KV cache), the decoder ``inference/images.py``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from detailflow_jax import distributed, sharding
from detailflow_jax.ar.logits import SamplingSettings
from detailflow_jax.ar.model import GPT, GPTConfig
from detailflow_jax.ar.sampling import Sampler
from detailflow_jax.inference import pictures
from detailflow_jax.inference.images import TokenDecoder
from detailflow_jax.pixels import to_uint8

SETTING_KEYS = ("cfg_scale", "cfg_schedule", "cfg_interval", "temperature", "top_k", "top_p")


def sampling_settings(section: Any, **overrides) -> SamplingSettings:
    """SamplingSettings from a config ``sampling`` section, with the non-None ``overrides``
    applied."""
    values = {k: section[k] for k in SETTING_KEYS if k in section}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingSettings.create(**values)


class ImageGenerator:
    """GPT sampling then tokenizer decoding. ``generate(labels, key)`` -> uint8 (B, R, R, 3), the
    same on every process (B must divide over the mesh's data axes); one compilation per batch
    size."""

    def __init__(self, gpt_cfg: GPTConfig, gpt_params: Any, gpt_shardings: Any, tokenizer_cfg: Any,
                 tokenizer_params: Any, mesh: jax.sharding.Mesh, settings: SamplingSettings):
        self.gpt_cfg, self.params, self.mesh, self.settings = gpt_cfg, gpt_params, mesh, settings
        self.sampler = Sampler(GPT(gpt_cfg), mesh, gpt_shardings)
        self.decoder = TokenDecoder(tokenizer_cfg, tokenizer_params)

    @property
    def data_parallelism(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def tokens(self, labels: np.ndarray, key: jax.Array, params: Any = None) -> np.ndarray:
        """(B,) labels -> (B, N) token ids; ``params`` defaults to the loaded weights (the trainer
        passes its EMA)."""
        labels = jax.device_put(np.asarray(labels, np.int32), sharding.batch_sharding(self.mesh, 1))
        return distributed.to_host(
            self.sampler(self.params if params is None else params, labels, key, self.settings)
        )

    def decode(self, tokens: np.ndarray, t: int | None = None) -> np.ndarray:
        """(B, N) tokens -> uint8 images from their first t tokens (default all) at the canvas of t;
        any B."""
        pad = (-len(tokens)) % self.data_parallelism
        padded = np.concatenate([tokens, np.repeat(tokens[:1], pad, axis=0)])
        codes = jax.device_put(padded.astype(np.int32), sharding.batch_sharding(self.mesh, 2))
        return np.asarray(to_uint8(distributed.to_host(self.decoder.decode(codes, t))))[
            : len(tokens)
        ]

    def generate(self, labels: np.ndarray, key: jax.Array, params: Any = None) -> np.ndarray:
        return self.decode(self.tokens(labels, key, params))

    def in_batches(
        self, labels: np.ndarray, batch_size: int, fn, progress: bool = False
    ) -> np.ndarray:
        """``fn(padded labels, i)`` over batches of ``batch_size`` (the last padded with class 0),
        concatenated."""
        out = []
        bar = tqdm(total=len(labels), desc="sampling", unit="img", dynamic_ncols=True,
                   disable=not (progress and distributed.is_main_process()))
        for i, start in enumerate(range(0, len(labels), batch_size)):
            batch = labels[start:start + batch_size]
            out.append(fn(np.pad(batch, (0, batch_size - len(batch))), i)[:len(batch)])
            bar.update(len(batch))
        bar.close()
        return np.concatenate(out)

    def class_grid(
        self,
        classes: Sequence[int],
        per_class: int,
        key: jax.Array,
        batch_size: int,
        params: Any = None,
        class_names: Sequence[str] | None = None,
    ) -> pictures.SamplePictures:
        """Samples of each class (a row each, labelled with ``class_names`` or "class k"), decoded
        from their first t tokens for up to ``pictures.MAX_GIF_FRAMES`` token counts: the grid (all
        tokens), the strip and the GIF frames. Batch i samples with ``fold_in(key, i)``."""
        labels = np.repeat(np.asarray(classes, np.int32), per_class)
        tokens = self.in_batches(
            labels,
            batch_size,
            lambda batch, i: self.tokens(batch, jax.random.fold_in(key, i), params),
        )
        counts = pictures.spread(self.decoder.tables.token_counts, pictures.MAX_GIF_FRAMES)
        previews = [(t, self.decode(tokens, t)) for t in counts]
        return pictures.sample_pictures(
            previews, per_class, pictures.class_labels(classes, class_names)
        )

    def many(
        self, labels: np.ndarray, key: jax.Array, batch_size: int, progress: bool = True
    ) -> np.ndarray:
        """uint8 images for any number of labels; batch i samples with ``fold_in(key, i)``."""
        return self.in_batches(
            labels,
            batch_size,
            lambda batch, i: self.generate(batch, jax.random.fold_in(key, i)),
            progress,
        )


def default_classes(num_classes: int, config: Any) -> list[int]:
    """The rows of a sample grid: the config's ``sample_classes``, else the first 16 classes."""
    chosen = list(config.get("sample_classes", ()) or ()) if config else []
    return chosen or list(range(min(num_classes, 16)))
