"""Extracted token codes for AR training (official ``extract_codes_c2i.py``): ArrayRecord chunk
files, their metadata, and the grain pipeline.

A codes directory holds

    metadata.json                                   CodesMetadata (N, g, C, codebook size, views,
                                                    tokenizer, ...)
    codes-{chunk:05d}-of-{chunks:05d}.array_record  chunk c: images [c * chunk_size, (c + 1) *
                                                    chunk_size) of the split

One record per image, fixed size, little-endian: int32 source index, int32 label, then int16 codes
of shape (views, N, 3) with [clean, sc_input, sc_label] on the last axis (the official
``codes/{i}.npy`` layout). A chunk file appears only once complete (written under a temporary name,
then renamed), so an interrupted extraction resumes by skipping the chunk files that exist. Chunks
do not depend on the number of processes.

``make_code_iter`` reads them for training: seeded global shuffle, reshuffled every epoch, one view
per sample drawn uniformly with a per-element RNG (deterministic given the seed and the position in
the stream), this process's slice, batches ``{"codes": int16 (b, N, 3), "label": int32 (b,)}`` from
a checkpointable grain iterator.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import grain
import jax
import numpy as np
from etils import epath

from detailflow_jax import storage
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.data.pipeline import DataStream, SkipCounter

METADATA_FILE = "metadata.json"
# group_size 1: every record is its own block, so the shuffled reader decodes only what it reads.
WRITER_OPTIONS = "group_size:1,uncompressed"
_HEADER = np.dtype("<i4")
_CODE = np.dtype("<i2")


@dataclasses.dataclass(frozen=True)
class CodesMetadata:
    """What the AR trainer needs to know about a codes directory (written as metadata.json)."""
    num_tokens: int                 # N
    group_size: int                 # g
    causal_num: int                 # C
    codebook_size: int
    views: int                      # code sequences per image (10 for ten-crop)
    view_mode: str                  # "center" | "center_flip" | "ten_crop"
    num_images: int                 # images in the split (before skipping unreadable ones)
    num_classes: int
    class_names: list
    image_size: int
    chunk_size: int
    num_chunks: int
    seed: int                       # noise spans and noisy codes are drawn from (seed, image index)
    tokenizer: dict                 # {"path": str, "model": tokenizer model config}
    data: dict                      # the data config the images came from
    split: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CodesMetadata":
        return cls(**json.loads(text))


def chunk_path(directory: str, chunk: int, num_chunks: int) -> epath.Path:
    return storage.path(directory) / f"codes-{chunk:05d}-of-{num_chunks:05d}.array_record"


def encode_record(index: int, label: int, codes: np.ndarray) -> bytes:
    """(views, N, 3) integer codes -> the fixed-size record described in the module docstring."""
    if codes.min() < np.iinfo(_CODE).min or codes.max() > np.iinfo(_CODE).max:
        raise ValueError(f"codes out of int16 range [{codes.min()}, {codes.max()}]")
    return (
        np.asarray([index, label], _HEADER).tobytes() + np.ascontiguousarray(codes, _CODE).tobytes()
    )


def decode_record(data: bytes, views: int, num_tokens: int) -> tuple[int, int, np.ndarray]:
    """The inverse of ``encode_record``: (index, label, int16 codes (views, N, 3))."""
    header = np.frombuffer(data, _HEADER, count=2)
    codes = np.frombuffer(data, _CODE, offset=2 * _HEADER.itemsize).reshape(views, num_tokens, 3)
    return int(header[0]), int(header[1]), codes


class ChunkWriter:
    """Writes one chunk file; it appears under its final name only after ``commit()``. The
    ArrayRecord writer needs a local file: for a bucket it writes one in the temporary directory and
    uploads it at ``commit()``."""

    def __init__(self, directory: str, chunk: int, num_chunks: int):
        from array_record.python.array_record_module import ArrayRecordWriter
        self.path = chunk_path(directory, chunk, num_chunks)
        local = epath.Path(tempfile.gettempdir()) if storage.is_uri(self.path) else self.path.parent
        self._tmp = local / f"{self.path.name}.tmp-{os.getpid()}"
        self._writer = ArrayRecordWriter(os.fspath(self._tmp), WRITER_OPTIONS)
        self.count = 0

    def write(self, index: int, label: int, codes: np.ndarray) -> None:
        self._writer.write(encode_record(index, label, codes))
        self.count += 1

    def commit(self) -> str:
        self._writer.close()
        if storage.is_uri(self.path):
            self._tmp.copy(self.path, overwrite=True)
            self._tmp.unlink()
        else:
            self._tmp.replace(self.path)
        return os.fspath(self.path)

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)


def read_metadata(directory: str) -> CodesMetadata:
    path = storage.path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: extract codes first (python -m detailflow_jax.tokenizer.extract "
            f"... --out {directory})"
        )
    return CodesMetadata.from_json(path.read_text())


def missing_chunks(directory: str, meta: CodesMetadata) -> list[int]:
    return [
        c for c in range(meta.num_chunks) if not chunk_path(directory, c, meta.num_chunks).is_file()
    ]


def open_codes(directory: str) -> tuple[CodesMetadata, list[str]]:
    """(metadata, chunk files in order); an incomplete extraction is an error that says how to
    finish it."""
    directory = storage.path(directory)
    meta = read_metadata(directory)
    missing = missing_chunks(directory, meta)
    if missing:
        raise FileNotFoundError(
            f"{directory} is incomplete: {len(missing)} of {meta.num_chunks} chunk files are "
            "missing (first: "
            f"{chunk_path(directory, missing[0], meta.num_chunks).name}); rerun the extraction "
            "command "
            "with the same --out to finish it"
        )
    stray = set(map(os.fspath, directory.glob("codes-*.array_record"))) - {
        os.fspath(chunk_path(directory, c, meta.num_chunks)) for c in range(meta.num_chunks)}
    if stray:
        raise ConfigError(
            f"{directory} holds chunk files of another extraction ({sorted(stray)[0]}, ...); use a "
            "clean "
            "directory"
        )
    return meta, [
        os.fspath(chunk_path(directory, c, meta.num_chunks)) for c in range(meta.num_chunks)
    ]


@dataclasses.dataclass
class PickView(grain.transforms.RandomMap):
    """Decodes a record and keeps one of its views, drawn uniformly (official ``CustomDataset`` with
    "flip")."""
    views: int
    num_tokens: int

    def random_map(self, record: bytes, rng: np.random.Generator) -> dict[str, Any]:
        _, label, codes = decode_record(record, self.views, self.num_tokens)
        view = int(rng.integers(self.views)) if self.views > 1 else 0
        return {"codes": codes[view], "label": np.int32(label)}


def make_code_iter(
    directory: str,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 4,
    prefetch: int = 256,
) -> DataStream:
    """Endless shuffled batches of ``batch_size // process_count`` code sequences for this
    process."""
    meta, files = open_codes(directory)
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if batch_size <= 0 or batch_size % count:
        raise ConfigError(
            f"batch_size={batch_size} (global) must be a positive multiple of the {count} processes"
        )
    source = grain.sources.ArrayRecordDataSource(files)  # reads gs:// itself
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    # Pick the view before slicing so each element's RNG depends on its global position, not on the
    # process.
    ds = ds.random_map(PickView(meta.views, meta.num_tokens))[index::count]
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    )
    ds = ds.batch(batch_size // count, drop_remainder=True)
    return DataStream(
        iter(ds), list(meta.class_names), len(source), batch_size // count, SkipCounter()
    )
