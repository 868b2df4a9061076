"""Pictures a person can read: image grids with every tile upscaled to a readable size with
nearest-neighbour pixels (so the model's pixels stay visible as blocks), labelled — class names
beside the rows, token counts above the columns of a coarse-to-fine strip, "input" /
"reconstruction" beside the rows of a reconstruction grid — and an animated GIF of a sample grid
refining as tokens arrive (frame k: every sample decoded from its first t_k tokens, the last frame
held longer).

Text uses Pillow's built-in default font (scalable from Pillow 10.1; nothing is read from or
downloaded to disk). Files are written through ``etils.epath``, so any path epath opens works.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from detailflow_jax import storage

# px a tile is scaled towards (by a whole factor: 28 px -> 112, 32 -> 128, 256 stays 256)
READABLE_TILE = 112
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
MAX_STRIP_COLUMNS = 8
MAX_GIF_FRAMES = 16
FRAME_MS, LAST_FRAME_MS = 500, 2500


def tile_size(image_size: int, target: int = READABLE_TILE) -> int:
    """The readable size of an image_size-px tile: a whole multiple of it near ``target`` (never
    smaller)."""
    return image_size * max(1, round(target / image_size))


def upscale(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (..., h, w, C) -> (..., size, size, C) by nearest neighbour: output pixel i takes input
    pixel floor(i * h / size), so a whole factor k turns every pixel into a k x k block."""
    images = np.asarray(images)
    h, w = images.shape[-3:-1]
    rows = np.arange(size) * h // size
    cols = np.arange(size) * w // size
    return images[..., rows[:, None], cols[None, :], :]


def spread(values: Sequence[int], num: int) -> list[int]:
    """Up to ``num`` of the sorted ``values``, evenly spaced, the first and the last always
    included."""
    values = sorted(values)
    picks = np.linspace(0, len(values) - 1, min(num, len(values)))
    return sorted({values[int(round(i))] for i in picks})


def token_label(t: int) -> str:
    return f"t = {t}"


def frame_title(t: int) -> str:
    return f"t = {t} token" + ("" if t == 1 else "s")


def class_labels(classes: Sequence[int], names: Sequence[str] | None = None) -> list[str]:
    """Row labels for class ids: the class's name (its first comma-separated part, at most 24
    characters) when ``names`` covers it, else "class k"."""
    labels = []
    for k in classes:
        name = names[k] if names is not None and 0 <= k < len(names) and names[k] else f"class {k}"
        labels.append(str(name).split(",")[0].strip()[:24])
    return labels


def label_font(tile: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at a size that reads well beside a ``tile``-px image."""
    return ImageFont.load_default(size=max(12, tile // 8))


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Where everything goes in a labelled grid of ``rows`` x ``columns`` square tiles of ``tile``
    px: a title band on top, then a header band (column labels), then the tiles; a label band on the
    left (row labels)."""

    rows: int
    columns: int
    tile: int
    pad: int
    margin: int          # between a label and the band's edge
    left: int            # width of the row-label band (0 without row labels)
    title_height: int    # 0 without a title
    header_height: int   # 0 without column labels

    @property
    def top(self) -> int:
        return self.title_height + self.header_height

    @property
    def width(self) -> int:
        return self.left + self.columns * (self.tile + self.pad) + self.pad

    @property
    def height(self) -> int:
        return self.top + self.rows * (self.tile + self.pad) + self.pad

    def origin(self, row: int, column: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of a tile."""
        return (self.left + self.pad + column * (self.tile + self.pad),
                self.top + self.pad + row * (self.tile + self.pad))


def _text_size(font, text: str) -> tuple[int, int]:
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def grid_layout(rows: int, columns: int, tile: int, row_labels: Sequence[str] | None = None,
                column_labels: Sequence[str] | None = None, title: str | None = None) -> GridLayout:
    font = label_font(tile)
    margin = max(4, font.size // 2) if hasattr(font, "size") else 6
    line = _text_size(font, "Tg")[1] + 2 * margin
    left = max(_text_size(font, s)[0] for s in row_labels) + 2 * margin if row_labels else 0
    return GridLayout(
        rows,
        columns,
        tile,
        pad=max(2, tile // 32),
        margin=margin,
        left=left,
        title_height=line if title else 0,
        header_height=line if column_labels else 0,
    )


def labelled_grid(
    tiles: np.ndarray,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Image.Image:
    """uint8 (rows, columns, S, S, 3) tiles, already at their readable size -> one labelled RGB
    image."""
    tiles = np.asarray(tiles)
    rows, columns, tile = tiles.shape[0], tiles.shape[1], tiles.shape[2]
    for what, labels, num in (
        ("row_labels", row_labels, rows),
        ("column_labels", column_labels, columns),
    ):
        if labels is not None and len(labels) != num:
            raise ValueError(f"{what} has {len(labels)} entries for {num} {what.split('_')[0]}s")
    layout = grid_layout(rows, columns, tile, row_labels, column_labels, title)
    canvas = np.empty((layout.height, layout.width, 3), np.uint8)
    canvas[:] = BACKGROUND
    for r in range(rows):
        for c in range(columns):
            x, y = layout.origin(r, c)
            canvas[y:y + tile, x:x + tile] = tiles[r, c]
    image = Image.fromarray(canvas)
    draw, font = ImageDraw.Draw(image), label_font(tile)

    def centred(text, cx, cy, right=None):
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        x = (right - x1) if right is not None else cx - (x0 + x1) / 2
        draw.text((x, cy - (y0 + y1) / 2), text, fill=TEXT, font=font)

    if title:
        centred(title, layout.width / 2, layout.title_height / 2)
    for c, text in enumerate(column_labels or ()):
        centred(
            text, layout.origin(0, c)[0] + tile / 2, layout.title_height + layout.header_height / 2
        )
    for r, text in enumerate(row_labels or ()):
        centred(text, None, layout.origin(r, 0)[1] + tile / 2, right=layout.left - layout.margin)
    return image


def image_grid(images: np.ndarray, columns: int, row_labels: Sequence[str] | None = None,
               column_labels: Sequence[str] | None = None, title: str | None = None,
               tile: int | None = None) -> Image.Image:
    """uint8 (B, H, W, 3), B = rows x columns in row-major order -> a labelled grid of readable
    tiles."""
    images = np.asarray(images)
    if len(images) % columns:
        raise ValueError(f"{len(images)} images do not fill rows of {columns}")
    tile = tile or tile_size(images.shape[1])
    tiles = upscale(images, tile)
    return labelled_grid(
        tiles.reshape(len(images) // columns, columns, *tiles.shape[1:]),
        row_labels,
        column_labels,
        title,
    )


def strip(columns: Sequence[tuple[str, np.ndarray]], row_labels: Sequence[str] | None = None,
          title: str | None = None) -> Image.Image:
    """[(column label, uint8 (B, h, w, 3))] -> B rows, one labelled column each; every column is
    upscaled to the readable size of the largest image, so a row reads coarse -> fine."""
    tile = tile_size(max(images.shape[1] for _, images in columns))
    # (B, columns, S, S, 3)
    tiles = np.stack([upscale(images, tile) for _, images in columns], axis=1)
    return labelled_grid(tiles, row_labels, [label for label, _ in columns], title)


def reconstruction_grid(
    inputs: np.ndarray, reconstructions: np.ndarray, title: str | None = None
) -> Image.Image:
    """Two labelled rows: the inputs over their reconstructions."""
    return image_grid(np.concatenate([inputs, reconstructions]), columns=len(inputs),
                      row_labels=("input", "reconstruction"), title=title)


def refinement_frames(previews: Sequence[tuple[int, np.ndarray]], columns: int,
                      row_labels: Sequence[str] | None = None) -> list[Image.Image]:
    """[(t, uint8 (B, canvas_t, canvas_t, 3))] for increasing t -> one grid per t, titled "t = k
    tokens", every frame at the readable size of the largest canvas (so all frames have one
    geometry)."""
    tile = tile_size(max(images.shape[1] for _, images in previews))
    return [
        image_grid(images, columns, row_labels, title=frame_title(t), tile=tile)
        for t, images in previews
    ]


class SamplePictures(NamedTuple):
    grid: Image.Image                # all tokens, one row per class
    strip: Image.Image               # each row's first sample from its first t tokens, t growing to
                                     # the right
    frames: list[Image.Image]        # the grid refining as tokens arrive

    def save(self, directory: str | epath.PathLike, suffix: str = "") -> dict[str, epath.Path]:
        """samples{suffix}.png, coarse_to_fine{suffix}.png and samples{suffix}.gif in
        ``directory``."""
        directory = epath.Path(directory)
        paths = {"samples": directory / f"samples{suffix}.png",
                 "coarse_to_fine": directory / f"coarse_to_fine{suffix}.png",
                 "refinement": directory / f"samples{suffix}.gif"}
        save_png(self.grid, paths["samples"])
        save_png(self.strip, paths["coarse_to_fine"])
        save_gif(self.frames, paths["refinement"])
        return paths


def sample_pictures(previews: Sequence[tuple[int, np.ndarray]], per_class: int,
                    row_labels: Sequence[str] | None = None) -> SamplePictures:
    """previews [(t, uint8 (rows x per_class, canvas_t, canvas_t, 3))] of class-ordered samples,
    increasing t, the last with all tokens -> the grid, the strip (up to MAX_STRIP_COLUMNS token
    counts) and the GIF frames."""
    shown = set(spread([t for t, _ in previews], MAX_STRIP_COLUMNS))
    columns = [(token_label(t), images[::per_class]) for t, images in previews if t in shown]
    return SamplePictures(grid=image_grid(previews[-1][1], per_class, row_labels),
                          strip=strip(columns, row_labels),
                          frames=refinement_frames(previews, per_class, row_labels))


def save_png(image: Image.Image, path: str | epath.PathLike) -> epath.Path:
    return storage.save_image(image, path, optimize=True)


def save_gif(frames: Sequence[Image.Image], path: str | epath.PathLike, frame_ms: int = FRAME_MS,
             last_ms: int = LAST_FRAME_MS) -> epath.Path:
    """An endlessly looping GIF, every frame shown ``frame_ms``, the last ``last_ms``."""
    durations = [frame_ms] * (len(frames) - 1) + [last_ms]
    return storage.save_image(
        frames[0], path, save_all=True, append_images=list(frames[1:]), duration=durations, loop=0
    )
