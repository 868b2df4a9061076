"""Random-access data sources behind one record format, and the dispatch from ``data_cfg.name`` to
them.

Every source is a grain ``RandomAccessDataSource`` (``__len__`` + ``__getitem__``) whose records are
``{"image": encoded bytes | uint8 (H, W, C) array, "label": int, "file_name": str | bytes}``; the
pipeline decodes either kind of ``image`` with PIL, so the same pipeline serves all sources.
"""

from __future__ import annotations

import numpy as np

from detailflow_jax import storage
from detailflow_jax.config_lib import require


class SyntheticSource:
    """A tiny in-memory dataset of random uint8 images and labels, for tests and smoke runs (no
    files needed)."""

    def __init__(
        self,
        num_examples: int = 64,
        image_size: int = 32,
        num_classes: int = 10,
        seed: int = 0,
        channels: int = 3,
    ):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(
            0, 256, (num_examples, image_size, image_size, channels), dtype=np.uint8
        )
        self.labels = rng.integers(0, num_classes, num_examples)
        self.class_names = [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.images[index],
            "label": int(self.labels[index]),
            "file_name": f"synthetic/{index}",
        }

    def __repr__(self) -> str:
        return f"SyntheticSource(num_examples={len(self)}, image_shape={self.images.shape[1:]})"


SOURCE_NAMES = ("fashion_mnist", "imagefolder", "synthetic")
DEFAULT_EVAL_SPLIT = {"fashion_mnist": "test", "imagefolder": "val", "synthetic": "val"}


def open_source(data_cfg, split: str):
    """(source, class names) for ``data_cfg.name`` and ``split``; ``data_cfg`` as completed by
    ``pipeline.default_data_config`` (the fields are documented there)."""
    name = data_cfg.name
    require(name in SOURCE_NAMES, "data.name", name, f"must be one of {SOURCE_NAMES}")
    if name != "fashion_mnist":
        require(data_cfg.pad_to is None, "data.pad_to", data_cfg.pad_to,
                "only applies to fashion_mnist (pad the 28x28 images)")
    if name == "synthetic":
        # Each split gets its own images so "eval" is not a copy of "train".
        source = SyntheticSource(
            data_cfg.synthetic_examples,
            data_cfg.image_size,
            data_cfg.synthetic_classes,
            seed=data_cfg.synthetic_seed + (split != "train"),
        )
        return source, source.class_names
    if name == "fashion_mnist":
        require(
            not (data_cfg.data_dir and storage.is_uri(data_cfg.data_dir)),
            "data.data_dir",
            data_cfg.data_dir,
            "the Fashion-MNIST files are read from a local disk: copy them there, or mount the "
            "bucket (e.g. "
            "gcsfuse --implicit-dirs BUCKET /mnt/BUCKET) and pass the mounted path",
        )
        from detailflow_jax.data.fashion_mnist import FashionMnistSource

        source = FashionMnistSource(
            split, data_cfg.data_dir, pad_to=data_cfg.pad_to, rgb=data_cfg.rgb
        )
        return source, source.class_names
    from detailflow_jax.data.imagefolder import open_imagefolder  # imports tensorflow_datasets
    require(
        bool(data_cfg.data_dir),
        "data.data_dir",
        data_cfg.data_dir,
        "imagefolder needs the TFDS data_dir written by `python -m "
        "detailflow_jax.data.imagefolder`",
    )
    return open_imagefolder(data_cfg.data_dir, split)
