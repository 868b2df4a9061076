"""ADM crops, ten-crop and scaling (docs/model.md#data-transforms) against hand-computed results."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from detailflow_jax.data import transforms


def _image(width, height, seed=0):
    return Image.fromarray(
        np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    )


def test_center_crop_without_resize_is_the_central_window():
    img = _image(12, 8)  # short side already the target: the BICUBIC resize is the identity
    np.testing.assert_array_equal(transforms.center_crop_arr(img, 8), np.asarray(img)[:, 2:10])


def test_center_crop_halves_with_box_then_resizes_bicubic():
    img = _image(40, 20)
    # 20 >= 2*8 -> BOX to 20x10; 10 < 16 stops; scale 8/10 -> 16x8 BICUBIC; crop x offset (16-8)//2
    # = 4.
    expected = np.asarray(img.resize((20, 10), Image.BOX).resize((16, 8), Image.BICUBIC))[:, 4:12]
    np.testing.assert_array_equal(transforms.center_crop_arr(img, 8), expected)


def test_random_crop_draws_short_side_from_the_adm_range(monkeypatch):
    drawn = []
    resize = transforms._resize_short_side

    def spy(pil, short_side):
        drawn.append(short_side)
        return resize(pil, short_side)

    monkeypatch.setattr(transforms, "_resize_short_side", spy)
    rng = np.random.default_rng(0)
    img = _image(50, 40)
    crops = [transforms.random_crop_arr(img, 16, rng) for _ in range(200)]
    assert set(drawn) == set(range(16, math.ceil(16 / 0.8) + 1))  # U{16..20}
    assert all(c.shape == (16, 16, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) > 50  # positions vary too


def test_random_crop_is_deterministic_given_the_rng():
    img = _image(50, 40)
    a = transforms.random_crop_arr(img, 16, np.random.default_rng(7))
    b = transforms.random_crop_arr(img, 16, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_ten_crop_matches_torchvision_order():
    arr = np.arange(7 * 9 * 1, dtype=np.int32).reshape(7, 9, 1)
    crops = transforms.ten_crop(arr, 4)
    assert crops.shape == (10, 4, 4, 1)
    top, left = int(round((7 - 4) / 2)), int(round((9 - 4) / 2))
    expected = [arr[:4, :4], arr[:4, 5:], arr[3:, :4], arr[3:, 5:], arr[top:top + 4, left:left + 4]]
    mirror = arr[:, ::-1]
    expected += [
        mirror[:4, :4],
        mirror[:4, 5:],
        mirror[3:, :4],
        mirror[3:, 5:],
        mirror[top : top + 4, left : left + 4],
    ]
    np.testing.assert_array_equal(crops, np.stack(expected))
    with pytest.raises(ValueError, match="larger than the image"):
        transforms.ten_crop(arr, 8)


def test_to_float_range_and_decode_kinds():
    np.testing.assert_allclose(transforms.to_float(np.array([0, 255], np.uint8)), [-1.0, 1.0])
    buf = io.BytesIO()
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(buf, "PNG")  # gray PNG -> RGB
    assert transforms.decode_image(buf.getvalue()).mode == "RGB"
    assert transforms.decode_image(np.zeros((5, 6, 1), np.uint8)).mode == "L"
    with pytest.raises(transforms.DECODE_ERRORS):
        transforms.decode_image(b"not an image")
