"""grain input pipelines for tokenizer training, evaluation and code extraction.

``make_train_iter(data_cfg, batch_size, seed)`` / ``make_eval_iter(data_cfg, batch_size)`` return a
``DataStream`` whose ``iterator`` yields per-process batches ``{"image": float32 (b, S, S, C) in
[-1, 1], "label": int32 (b,), "index": int32 (b,)}`` (``index``: position of the image in the source
split; ten-crop images are (b, 10, S, S, C)). ``b = batch_size // process_count``: ``batch_size`` is
the *global* batch. ``global_batch.to_global`` turns a batch into sharded global arrays. The
iterator is a grain ``DatasetIterator``: ``get_state()`` / ``set_state()`` and orbax
``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)`` resume on the exact next batch.

Train order (``MapDataset``, lazy): source -> attach index -> seeded global shuffle, reshuffled
every epoch -> repeat forever -> decode + augment with a per-element RNG from (seed, global
position) -> this process's slice ``[process_index::process_count]`` -> threads (and optionally
worker processes) -> drop corrupt images -> batch with ``drop_remainder``. Every process shuffles
the same way and takes a disjoint stride, so together they cover each epoch. Eval: no shuffle, no
augmentation, one pass; the split is cut to a multiple of ``process_count`` so every process yields
the same number of batches (the at most ``process_count - 1`` last images are dropped).

Corrupt or unreadable images are skipped *before* batching (batches stay full), logged with their
file name, and counted in ``DataStream.skipped`` (main process; counts images decoded so far,
including read-ahead). If more than half of 1,000 consecutive records are unreadable the iterator
raises instead of searching forever.

``data_cfg`` fields (``default_data_config()`` holds the defaults; unknown fields are errors):
  name            "synthetic" | "fashion_mnist" | "imagefolder".
  data_dir        imagefolder: the TFDS data_dir written by ``python -m
                  detailflow_jax.data.imagefolder``;
                  fashion_mnist: a directory with the IDX files (None:
                  $DETAILFLOW_FASHION_MNIST_DIR, then /usr/share/datasets/fashion-mnist). Unused by
                  synthetic.
  image_size      output side S (the official tokenizer uses 256).
  pad_to          fashion_mnist only: zero-pad 28x28 to pad_to x pad_to first (e.g. 32).
  rgb             fashion_mnist only: repeat the gray channel to 3 channels (default True).
  train_split     default "train".
  eval_split      None: "val" (imagefolder, synthetic) or "test" (fashion_mnist).
  train_crop      "adm_random" (official ``random_crop_arr``, default) | "center" (ADM centre crop;
                  no scale augmentation).
  min_crop_frac / max_crop_frac   ADM random crop range; short side ~ U{ceil(S/max)..ceil(S/min)}
                                  (0.8 / 1.0).
  flip            random horizontal flip p=0.5 in training (default True).
  eval_crop       "center" (ADM ``center_crop_arr``) | "ten_crop" (official extraction: centre crop
                  to int(S*ten_crop_scale), then TenCrop(S): 4 corners + centre, and the same of the
                  mirror image).
  ten_crop_scale  1.1.
  num_threads     decode/augment threads per process (grain ReadOptions.num_threads), default 16.
  prefetch        elements buffered per process (ReadOptions.prefetch_buffer_size), default 256.
  num_workers     >0: also decode in that many worker processes (grain ``mp_prefetch``); 0
                  (default): threads only.
  synthetic_examples / synthetic_classes / synthetic_seed   size of the synthetic source (64 / 10 /
                                                            0).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from ml_collections import config_dict

from detailflow_jax.config_lib import ConfigError, require
from detailflow_jax.data import transforms
from detailflow_jax.data.sources import DEFAULT_EVAL_SPLIT, open_source

log = logging.getLogger(__name__)

TRAIN_CROPS = ("adm_random", "center")
EVAL_CROPS = ("center", "ten_crop")
_ERROR_KEY = "error"  # marks a record whose image could not be decoded; removed before batching
# Raise (grain checks every 1,000 records) instead of spinning forever when most images are
# unreadable.
_MAX_CORRUPT_FRACTION = 0.5
# Fields whose default is None ("not set"), with the type a command-line override gives them.
_OPTIONAL_FIELDS = {"data_dir": str, "pad_to": int, "eval_split": str}


def default_data_config(**overrides) -> ml_collections.ConfigDict:
    """The data fields with their defaults (see the module docstring), updated with
    ``overrides``."""
    fields: dict[str, Any] = dict(
        name="synthetic", data_dir=None, image_size=256, pad_to=None, rgb=True,
        train_split="train", eval_split=None,
        train_crop="adm_random", min_crop_frac=0.8, max_crop_frac=1.0, flip=True,
        eval_crop="center", ten_crop_scale=1.1,
        num_threads=16, prefetch=256, num_workers=0,
        synthetic_examples=64, synthetic_classes=10, synthetic_seed=0)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"unknown data config fields {unknown}; known: {sorted(fields)}")
    fields.update(overrides)
    for key, kind in _OPTIONAL_FIELDS.items():
        # A typed reference, so `--config.data.<key>=...` can set a field whose value is None.
        fields[key] = config_dict.FieldReference(fields[key], field_type=kind)
    return ml_collections.ConfigDict(fields)


def complete_config(data_cfg) -> ml_collections.ConfigDict:
    cfg = default_data_config(**dict(data_cfg.items()))
    require(cfg.image_size > 0, "data.image_size", cfg.image_size, "must be positive")
    require(
        cfg.train_crop in TRAIN_CROPS,
        "data.train_crop",
        cfg.train_crop,
        f"must be one of {TRAIN_CROPS}",
    )
    require(
        cfg.eval_crop in EVAL_CROPS, "data.eval_crop", cfg.eval_crop, f"must be one of {EVAL_CROPS}"
    )
    require(0 < cfg.min_crop_frac <= cfg.max_crop_frac <= 1, "data.min_crop_frac/max_crop_frac",
            (cfg.min_crop_frac, cfg.max_crop_frac), "need 0 < min_crop_frac <= max_crop_frac <= 1")
    require(cfg.ten_crop_scale >= 1, "data.ten_crop_scale", cfg.ten_crop_scale, "must be >= 1")
    return cfg


class SkipCounter:
    """Counts (thread-safely) and logs the images the pipeline skipped because they could not be
    decoded."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0
        self.examples: list[str] = []  # the first few messages, for reports

    def add(self, message: str) -> None:
        with self._lock:
            self.count += 1
            if len(self.examples) < 20:
                self.examples.append(message)
        log.warning("skipping corrupt image (%d so far): %s", self.count, message)


@dataclasses.dataclass
class DropCorrupt(grain.transforms.Filter):
    """Removes records marked by the decode step, counting them."""
    counter: SkipCounter

    def filter(self, element: dict) -> bool:
        if _ERROR_KEY in element:
            self.counter.add(element[_ERROR_KEY])
            return False
        return True


def _decode_or_error(record: dict):
    """(PIL image, None), or (None, marker record) when the image is corrupt."""
    try:
        return transforms.decode_image(record["image"]), None
    except transforms.DECODE_ERRORS as e:
        name = record.get("file_name", "?")
        name = name.decode() if isinstance(name, bytes) else name
        return None, {_ERROR_KEY: f"{name} (index {record['index']}): {type(e).__name__}: {e}"}


def _output(image: np.ndarray, record: dict) -> dict:
    return {"image": transforms.to_float(image), "label": np.int32(record["label"]),
            "index": np.int32(record["index"])}


@dataclasses.dataclass
class TrainTransform(grain.transforms.RandomMap):
    """Decode, ADM random (or centre) crop, random flip, scale to [-1, 1]."""
    image_size: int
    crop: str = "adm_random"
    flip: bool = True
    min_crop_frac: float = 0.8
    max_crop_frac: float = 1.0

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        pil, error = _decode_or_error(record)
        if error is not None:
            return error
        if self.crop == "adm_random":
            arr = transforms.random_crop_arr(
                pil, self.image_size, rng, self.min_crop_frac, self.max_crop_frac
            )
        else:
            arr = transforms.center_crop_arr(pil, self.image_size)
        if self.flip:
            arr = transforms.random_flip(arr, rng)
        return _output(arr, record)


@dataclasses.dataclass
class EvalTransform(grain.transforms.Map):
    """Decode, ADM centre crop (or centre crop to int(S*scale) then ten-crop), scale to [-1, 1]."""
    image_size: int
    crop: str = "center"
    ten_crop_scale: float = 1.1

    def map(self, record: dict) -> dict:
        pil, error = _decode_or_error(record)
        if error is not None:
            return error
        if self.crop == "ten_crop":
            arr = transforms.center_crop_arr(pil, int(self.image_size * self.ten_crop_scale))
            return _output(transforms.ten_crop(arr, self.image_size), record)
        return _output(transforms.center_crop_arr(pil, self.image_size), record)


@dataclasses.dataclass
class AttachIndex(grain.transforms.MapWithIndex):
    """Adds the record's position in the source; MapDataset indices past the end wrap around
    (repeat)."""
    num_examples: int

    def map_with_index(self, index: int, record: dict) -> dict:
        return {**record, "index": index % self.num_examples}


def _process_slot(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} must lie in [0, process_count={count})")
    return index, count


def _per_process_batch(batch_size: int, process_count: int) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise ConfigError(f"batch_size={batch_size} (global) must be a positive multiple of the "
                          f"{process_count} processes")
    return batch_size // process_count


def finish_dataset(map_ds: grain.MapDataset, batch_size: int, cfg, counter: SkipCounter,
            drop_remainder: bool = True) -> grain.IterDataset:
    """Threads (+ worker processes) -> drop corrupt records in this process -> batch."""
    ds = map_ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
    )
    if cfg.num_workers > 0:
        from absl import flags
        # grain's workers read absl flags; outside an absl app use their defaults
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    ds = ds.filter(DropCorrupt(counter)).batch(batch_size, drop_remainder=drop_remainder)
    options = grain.experimental.DatasetOptions(filter_raise_threshold_ratio=_MAX_CORRUPT_FRACTION)
    return grain.experimental.WithOptionsIterDataset(ds, options)


def train_dataset(source, cfg, batch_size: int, seed: int, process_index: int, process_count: int,
                  counter: SkipCounter) -> grain.IterDataset:
    """The training pipeline over ``source`` with per-process batch ``batch_size`` (see the module
    docstring)."""
    ds = (
        grain.MapDataset.source(source)
        .map_with_index(AttachIndex(len(source)))
        .seed(seed)
        .shuffle()
        .repeat()
    )
    # Augment before slicing so each element's RNG depends on its global position, not on the
    # process.
    ds = ds.random_map(
        TrainTransform(
            cfg.image_size, cfg.train_crop, cfg.flip, cfg.min_crop_frac, cfg.max_crop_frac
        )
    )
    return finish_dataset(ds[process_index::process_count], batch_size, cfg, counter)


def eval_dataset(
    source,
    cfg,
    batch_size: int,
    process_index: int,
    process_count: int,
    counter: SkipCounter,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """One ordered pass over ``source``; every process gets ``len(source) // process_count``
    images."""
    ds = grain.MapDataset.source(source).map_with_index(AttachIndex(len(source)))
    ds = ds[:len(ds) // process_count * process_count][process_index::process_count]
    ds = ds.map(EvalTransform(cfg.image_size, cfg.eval_crop, cfg.ten_crop_scale))
    return finish_dataset(ds, batch_size, cfg, counter, drop_remainder)


@dataclasses.dataclass
class DataStream:
    """A per-process batch iterator plus what the trainer needs to know about the data."""
    # checkpointable: get_state/set_state, grain.checkpoint.CheckpointSave
    iterator: grain.DatasetIterator
    class_names: list[str]
    num_examples: int  # images in the split (all processes; before skipping corrupt ones)
    batch_size: int  # per process
    skipped: SkipCounter

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self.iterator)

    def close(self) -> None:
        """Stops read-ahead threads and worker processes (otherwise they are torn down noisily at
        exit)."""
        self.iterator.close()


def make_train_iter(data_cfg, batch_size: int, seed: int, process_index: int | None = None,
                    process_count: int | None = None) -> DataStream:
    """Endless shuffled, augmented training batches of ``batch_size // process_count`` images for
    this process."""
    cfg = complete_config(data_cfg)
    process_index, process_count = _process_slot(process_index, process_count)
    local_batch = _per_process_batch(batch_size, process_count)
    source, class_names = open_source(cfg, cfg.train_split)
    counter = SkipCounter()
    ds = train_dataset(source, cfg, local_batch, seed, process_index, process_count, counter)
    return DataStream(iter(ds), class_names, len(source), local_batch, counter)


def make_eval_iter(
    data_cfg,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
) -> DataStream:
    """One ordered pass of centre-cropped (or ten-cropped) batches; ``drop_remainder=False`` keeps a
    short last batch (the same size on every process)."""
    cfg = complete_config(data_cfg)
    process_index, process_count = _process_slot(process_index, process_count)
    local_batch = _per_process_batch(batch_size, process_count)
    split = cfg.eval_split or DEFAULT_EVAL_SPLIT[cfg.name]
    source, class_names = open_source(cfg, split)
    counter = SkipCounter()
    ds = eval_dataset(
        source, cfg, local_batch, process_index, process_count, counter, drop_remainder
    )
    return DataStream(iter(ds), class_names, len(source), local_batch, counter)
