"""Readable pictures: nearest-neighbour upscaling, label bands with text in them, class-name rows,
GIF frames."""

import numpy as np
import pytest
from PIL import Image

from detailflow_jax.data.fashion_mnist import CLASS_NAMES
from detailflow_jax.inference import pictures


def gray(rng, n, size):
    """Gray uint8 images (R = G = B), so a GIF palette holds them exactly."""
    return rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8).repeat(3, axis=-1)


def is_background(region):
    return np.all(np.asarray(region) == pictures.BACKGROUND, axis=-1)


def test_tile_size_is_a_whole_multiple_near_the_readable_size():
    assert pictures.tile_size(28) == 112
    assert pictures.tile_size(32) == 128
    assert pictures.tile_size(256) == 256  # large images are never shrunk


def test_upscale_turns_every_pixel_into_a_block():
    images = gray(np.random.default_rng(0), 2, 7)
    big = pictures.upscale(images, 28)
    assert big.shape == (2, 28, 28, 3)
    np.testing.assert_array_equal(big, images.repeat(4, axis=1).repeat(4, axis=2))
    # not a whole factor: still every output pixel copies its nearest input
    odd = pictures.upscale(images, 10)
    np.testing.assert_array_equal(odd[:, 9, 9], images[:, 6, 6])
    np.testing.assert_array_equal(odd[:, 0, 0], images[:, 0, 0])


def test_grid_geometry_and_tiles():
    images = gray(np.random.default_rng(1), 6, 28)
    plain = pictures.image_grid(images, columns=3)
    layout = pictures.grid_layout(2, 3, 112)
    assert layout.left == layout.title_height == layout.header_height == 0
    assert plain.size == (3 * (112 + layout.pad) + layout.pad, 2 * (112 + layout.pad) + layout.pad)
    pixels = np.asarray(plain)
    for i, image in enumerate(images):
        x, y = layout.origin(*divmod(i, 3))
        np.testing.assert_array_equal(
            pixels[y : y + 112, x : x + 112], image.repeat(4, axis=0).repeat(4, axis=1)
        )

    labelled = pictures.image_grid(
        images,
        columns=3,
        row_labels=["Trouser", "Ankle boot"],
        column_labels=list("abc"),
        title="t = 4 tokens",
    )
    layout = pictures.grid_layout(2, 3, 112, ["Trouser", "Ankle boot"], list("abc"), "t = 4 tokens")
    assert layout.left > 0 and layout.title_height > 0 and layout.header_height > 0
    assert labelled.size == (plain.size[0] + layout.left, plain.size[1] + layout.top)
    x, y = layout.origin(1, 2)  # the tiles move by the bands, unchanged
    np.testing.assert_array_equal(
        np.asarray(labelled)[y : y + 112, x : x + 112],
        pixels[-(112 + layout.pad) : -layout.pad, -(112 + layout.pad) : -layout.pad],
    )
    longer = pictures.grid_layout(2, 3, 112, ["Trouser", "Ankle boot, leather"])
    assert longer.left > layout.left


def test_text_is_drawn_in_the_label_bands():
    images = gray(np.random.default_rng(2), 4, 32)
    rows, columns = ["input", "reconstruction"], ["t = 1", "t = 32"]
    image = np.asarray(pictures.image_grid(images, 2, rows, columns, title="step 5"))
    layout = pictures.grid_layout(2, 2, 128, rows, columns, "step 5")
    assert not is_background(image[:layout.title_height]).all()  # the title
    for c in range(2):  # each column's label sits above its tile
        x, _ = layout.origin(0, c)
        assert not is_background(image[layout.title_height:layout.top, x:x + 128]).all()
    for r in range(2):  # each row's label sits beside its tile, inside the band
        _, y = layout.origin(r, 0)
        band = image[y:y + 128, :layout.left]
        assert not is_background(band).all()
        # text keeps its margin off the edge
        assert is_background(band[:, :layout.margin // 2]).all()
    between_rows = image[layout.origin(0, 0)[1] + 128:layout.origin(1, 0)[1], :layout.left]
    assert is_background(between_rows).all()


def test_class_labels_follow_the_class_order():
    assert pictures.class_labels([9, 0, 5], CLASS_NAMES) == ["Ankle boot", "T-shirt/top", "Sandal"]
    assert pictures.class_labels([3, 12], None) == ["class 3", "class 12"]
    assert pictures.class_labels([1, 2], ["tench, Tinca tinca", "goldfish"]) == [
        "goldfish",
        "class 2",
    ]
    assert pictures.class_labels([0], ["great grey owl, great gray owl, Strix nebulosa"]) == [
        "great grey owl"
    ]


def test_spread_keeps_both_ends():
    counts = [1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32]
    picked = pictures.spread(counts, 8)
    assert (
        len(picked) == 8 and picked[0] == 1 and picked[-1] == 32 and picked == sorted(set(picked))
    )
    assert pictures.spread(counts, 20) == counts


@pytest.fixture
def sample_previews():
    """Coarse-to-fine previews of 3 classes x 2 samples: canvases growing with t, the last with all
    32 tokens."""
    rng = np.random.default_rng(3)
    return [(t, gray(rng, 6, canvas)) for t, canvas in ((1, 4), (4, 8), (12, 16), (32, 32))]


def test_sample_pictures_grid_strip_and_refinement_gif(tmp_path, sample_previews):
    labels = pictures.class_labels([5, 7, 9], CLASS_NAMES)
    made = pictures.sample_pictures(sample_previews, per_class=2, row_labels=labels)
    paths = made.save(tmp_path / "out", suffix="_7")
    assert sorted(p.name for p in paths.values()) == [
        "coarse_to_fine_7.png",
        "samples_7.gif",
        "samples_7.png",
    ]

    grid = np.asarray(Image.open(paths["samples"]).convert("RGB"))
    layout = pictures.grid_layout(3, 2, 128, labels)
    assert grid.shape[:2] == (layout.height, layout.width)
    x, y = layout.origin(2, 1)  # the last sample of the last class, all tokens
    np.testing.assert_array_equal(
        grid[y : y + 128, x : x + 128], pictures.upscale(sample_previews[-1][1][5], 128)
    )

    strip = np.asarray(Image.open(paths["coarse_to_fine"]).convert("RGB"))
    layout = pictures.grid_layout(
        3, 4, 128, labels, [pictures.token_label(t) for t, _ in sample_previews]
    )
    assert strip.shape[:2] == (layout.height, layout.width)
    x, y = layout.origin(1, 0)  # class 7's first sample from 1 token: a 4-px canvas in 32-px blocks
    np.testing.assert_array_equal(
        strip[y : y + 128, x : x + 128], pictures.upscale(sample_previews[0][1][2], 128)
    )

    gif = Image.open(paths["refinement"])
    assert gif.n_frames == len(sample_previews)
    frames, durations = [], []
    for k in range(gif.n_frames):
        gif.seek(k)
        frames.append(np.asarray(gif.convert("RGB")))
        durations.append(gif.info["duration"])
    assert durations[-1] > max(durations[:-1])  # the finished grid is held longer
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))
    title = pictures.grid_layout(3, 2, 128, labels, title=pictures.frame_title(32)).title_height
    # the last frame is the full-token grid, titled
    np.testing.assert_array_equal(frames[-1][title:], grid)
    assert not is_background(frames[0][:title]).all()


def test_reconstruction_grid_labels_its_two_rows():
    rng = np.random.default_rng(4)
    inputs, recon = gray(rng, 3, 32), gray(rng, 3, 32)
    image = np.asarray(pictures.reconstruction_grid(inputs, recon))
    layout = pictures.grid_layout(2, 3, 128, ["input", "reconstruction"])
    assert image.shape[:2] == (layout.height, layout.width)
    x, y = layout.origin(1, 0)
    np.testing.assert_array_equal(image[y:y + 128, x:x + 128], pictures.upscale(recon[0], 128))


def test_mismatched_labels_are_refused():
    with pytest.raises(ValueError, match="row_labels has 1 entries for 2 rows"):
        pictures.image_grid(gray(np.random.default_rng(5), 4, 8), 2, row_labels=["one"])
