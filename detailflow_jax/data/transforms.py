"""Per-image transforms of the official pipelines (docs/model.md#data-transforms), on PIL images and
uint8 numpy arrays.

* ``random_crop_arr`` / ``center_crop_arr``: the ADM (guided-diffusion ``image_datasets.py``) crops,
  step for step: BOX halving while the short side is at least twice the target, BICUBIC resize of
  the short side, then a crop. The official code draws with Python's ``random``; we draw from the
  ``np.random.Generator`` grain hands to each element, so the distribution is the same and the draw
  is deterministic per (seed, epoch, index).
* ``ten_crop``: torchvision ``TenCrop`` (4 corners + centre of the image, then the same of its
  mirror image).
* ``to_float``: ``ToTensor`` + ``Normalize(0.5, 0.5)``, i.e. uint8 -> float32 in [-1, 1], kept NHWC.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# What PIL raises for files that are not images, truncated, or too large to be trusted.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_image(image: bytes | np.ndarray) -> Image.Image:
    """Encoded bytes (JPEG/PNG/...) -> a fully loaded RGB PIL image; a uint8 (H, W, 1|3) array ->
    "L"/"RGB" image.

    Raises one of ``DECODE_ERRORS`` for corrupt data; the caller decides to skip and count.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise ValueError(
                f"expected a uint8 (H, W, 1|3) image array, got {image.dtype} {image.shape}"
            )
        return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    pil = Image.open(io.BytesIO(image))
    pil.load()  # decode now, so a truncated file fails here and not inside a crop
    return pil if pil.mode == "RGB" else pil.convert("RGB")


def _box_halve(pil_image: Image.Image, target_short_side: int) -> Image.Image:
    # ADM's stand-in for PIL's `reducing_gap`: cheap, alias-free downsampling by powers of two.
    while min(*pil_image.size) >= 2 * target_short_side:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    return pil_image


def _resize_short_side(pil_image: Image.Image, short_side: int) -> np.ndarray:
    pil_image = _box_halve(pil_image, short_side)
    scale = short_side / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.asarray(pil_image)
    return arr[..., None] if arr.ndim == 2 else arr  # gray images keep a channel axis


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM ``center_crop_arr``: short side -> ``image_size``, then the central square (floor
    offsets)."""
    arr = _resize_short_side(pil_image, image_size)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def random_crop_arr(pil_image: Image.Image, image_size: int, rng: np.random.Generator,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> np.ndarray:
    """ADM ``random_crop_arr``: short side ~ U{ceil(s/max_frac) .. ceil(s/min_frac)}, then a uniform
    random crop."""
    smallest = math.ceil(image_size / max_crop_frac)
    largest = math.ceil(image_size / min_crop_frac)
    arr = _resize_short_side(pil_image, int(rng.integers(smallest, largest + 1)))
    crop_y = int(rng.integers(arr.shape[0] - image_size + 1))
    crop_x = int(rng.integers(arr.shape[1] - image_size + 1))
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def random_flip(arr: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Horizontal flip with probability ``p`` on an (H, W, C) array."""
    return arr[:, ::-1] if rng.random() < p else arr


def five_crop(arr: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision ``five_crop`` order: top-left, top-right, bottom-left, bottom-right, centre."""
    h, w = arr.shape[:2]
    if size > h or size > w:
        raise ValueError(f"crop size {size} is larger than the image {h}x{w}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    return [arr[y:y + size, x:x + size] for y, x in corners]


def ten_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``TenCrop(size)``: five crops of the image, then five of its mirror image -> (10,
    size, size, C)."""
    return np.stack(five_crop(arr, size) + five_crop(arr[:, ::-1], size))


def to_float(arr: np.ndarray) -> np.ndarray:
    """uint8 in [0, 255] -> float32 in [-1, 1] (``ToTensor`` then ``Normalize(0.5, 0.5)``)."""
    return arr.astype(np.float32) / 127.5 - 1.0
