"""Fashion-MNIST (70,000 28x28 grayscale images, 10 classes) from its four IDX files, as an
in-memory grain source.

Where the files are looked for, first hit wins:
1. the ``directory`` argument (``data_cfg.data_dir``);
2. ``$DETAILFLOW_FASHION_MNIST_DIR``;
3. ``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu: ``apt-get install dataset-fashion-mnist``).
A directory must hold ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` files, each raw or gzipped
(``.gz``).

Records have the same format as the image-folder source (``{"image", "label", "file_name"}``) so one
pipeline serves both; ``image`` is a uint8 (H, W, C) array instead of encoded bytes.
"""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np

ENV_VAR = "DETAILFLOW_FASHION_MNIST_DIR"
SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
APT_PACKAGE = "dataset-fashion-mnist"
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_UBYTE = 0x08


class FashionMnistError(FileNotFoundError):
    """The IDX files could not be found or read."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file of unsigned bytes (raw or gzipped) -> a uint8 array of the shape its header
    declares."""
    path = pathlib.Path(path)
    raw = (gzip.decompress if path.suffix == ".gz" else bytes)(path.read_bytes())
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE:
        raise FashionMnistError(
            f"{path} is not an unsigned-byte IDX file (bad magic {raw[:4].hex()})"
        )
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise FashionMnistError(
            f"{path}: header declares shape {shape} but holds {data.size} values"
        )
    return data.reshape(shape)


def _idx_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _file_stems(split: str) -> tuple[str, str]:
    prefix = SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def find_directory(directory: str | os.PathLike | None = None) -> pathlib.Path:
    """The first candidate directory holding all four IDX files; FashionMnistError naming the ways
    to fix it.

    A directory given explicitly is the only candidate: a wrong path is an error, never a silent
    fallback."""
    if directory:
        candidates = [pathlib.Path(directory)]
    else:
        candidates = [pathlib.Path(d) for d in (os.environ.get(ENV_VAR),) if d] + [SYSTEM_DIR]
    stems = [s for split in SPLIT_PREFIX for s in _file_stems(split)]
    for candidate in candidates:
        if all(_idx_file(candidate, s) for s in stems):
            return candidate
    raise FashionMnistError(
        f"Fashion-MNIST IDX files ({', '.join(stems)}, raw or .gz) not found in "
        f"{[str(c) for c in candidates]}. "
        f"Install them with `apt-get install {APT_PACKAGE}` (to {SYSTEM_DIR}), or point data_dir / "
        f"${ENV_VAR} at a directory holding the four files."
    )


class FashionMnistSource:
    """A grain ``RandomAccessDataSource`` over one split, held in memory (47 MB for train).

    ``pad_to`` zero-pads the 28x28 images centrally (e.g. to 32 for a patch-16 tokenizer); ``rgb``
    repeats the gray channel three times, since the tokenizer expects 3 channels.
    """

    def __init__(self, split: str = "train", directory: str | os.PathLike | None = None, *,
                 pad_to: int | None = None, rgb: bool = True):
        if split not in SPLIT_PREFIX:
            raise ValueError(
                f"Fashion-MNIST split {split!r} does not exist; use one of {sorted(SPLIT_PREFIX)}"
            )
        root = find_directory(directory)
        image_stem, label_stem = _file_stems(split)
        self.images = read_idx(_idx_file(root, image_stem))
        self.labels = read_idx(_idx_file(root, label_stem))
        if self.images.ndim != 3 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise FashionMnistError(
                f"{root}: {split} images {self.images.shape} and labels {self.labels.shape} "
                "do not form an (N, H, W) / (N,) pair"
            )
        height, width = self.images.shape[1:]
        if pad_to is not None and pad_to < max(height, width):
            raise ValueError(f"pad_to={pad_to} is smaller than the {height}x{width} images")
        self.split, self.directory, self.pad_to, self.rgb = split, root, pad_to, rgb
        self.class_names = list(CLASS_NAMES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        if self.pad_to is not None:
            height, width = image.shape
            top, left = (self.pad_to - height) // 2, (self.pad_to - width) // 2
            image = np.pad(
                image, ((top, self.pad_to - height - top), (left, self.pad_to - width - left))
            )
        image = np.repeat(image[..., None], 3 if self.rgb else 1, axis=-1)
        return {
            "image": image,
            "label": int(self.labels[index]),
            "file_name": f"{self.split}/{index:05d}",
        }

    def __repr__(self) -> str:
        return (
            f"FashionMnistSource(split={self.split!r}, directory={str(self.directory)!r}, "
            f"pad_to={self.pad_to})"
        )
