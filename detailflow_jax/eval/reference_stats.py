"""ADM-format reference batches: reading ``VIRTUAL_imagenet256_labeled.npz`` and writing our own.

An ADM reference batch is an ``.npz`` with ``mu``/``sigma`` (pool_3 statistics),
``mu_s``/``sigma_s`` (spatial statistics) and ``arr_0`` (uint8 NHWC reference images, used for
precision/recall). This module streams images from an image folder or an ``.npz`` (without loading
the whole array), runs them through ``InceptionFeatures`` and accumulates the statistics.

    python -m detailflow_jax.eval.reference_stats --images DIR_OR_NPZ --inception INCEPTION --out ref.npz

``INCEPTION`` is the orbax directory written by ``python -m detailflow_jax.convert.inception`` or
the pytorch-fid ``.pth`` itself.
"""  # noqa: E501

from __future__ import annotations

import contextlib
import dataclasses
import os
import zipfile
from typing import Callable, Iterator

import numpy as np
from absl import flags

from detailflow_jax import cli, cli_errors, storage
from detailflow_jax.eval import cli_flags
from detailflow_jax.nn.inception import POOL_DIM, SPATIAL_DIM
from detailflow_jax.eval.metrics import InceptionScoreAccumulator, RunningStats

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    mu: np.ndarray
    sigma: np.ndarray


@dataclasses.dataclass(frozen=True)
class ReferenceBatch:
    pool: FeatureStats
    spatial: FeatureStats
    images: np.ndarray | None = None  # arr_0: uint8 (N, H, W, 3)


def load_reference_batch(path: str | os.PathLike, with_images: bool = False) -> ReferenceBatch:
    """Reads ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (and ``arr_0`` if ``with_images``) from an ADM
    npz."""
    with storage.path(path).open("rb") as f, np.load(f) as data:
        missing = [k for k in ("mu", "sigma", "mu_s", "sigma_s") if k not in data.files]
        if missing:
            raise ValueError(
                f"{path} is not an ADM reference batch: missing {missing} (has {data.files}); "
                "compute "
                "one with `python -m detailflow_jax.eval.reference_stats`"
            )
        if with_images and "arr_0" not in data.files:
            raise ValueError(f"{path} has no arr_0 images (needed for precision/recall)")
        return ReferenceBatch(
            FeatureStats(data["mu"], data["sigma"]),
            FeatureStats(data["mu_s"], data["sigma_s"]),
            data["arr_0"] if with_images else None,
        )


def save_reference_batch(path: str | os.PathLike, ref: ReferenceBatch) -> None:
    arrays = dict(
        mu=ref.pool.mu, sigma=ref.pool.sigma, mu_s=ref.spatial.mu, sigma_s=ref.spatial.sigma
    )
    if ref.images is not None:
        arrays["arr_0"] = ref.images
    storage.save_npz(path, **arrays)


# ---- streaming image sources ---------------------------------------------------------------------

def _image_files(folder: str) -> list[str]:
    files = sorted(
        os.fspath(root / f)
        for root, _, names in storage.path(folder).walk()
        for f in names
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return files


def _read_image(path: str) -> np.ndarray:
    from PIL import Image
    with storage.path(path).open("rb") as f, Image.open(f) as img:
        return np.asarray(img.convert("RGB"))


@contextlib.contextmanager
def _npz_member(path: str, key: str = "arr_0"):
    """Opens one array of an npz as (file object positioned at the data, shape, dtype), like ADM's
    reader."""
    with storage.path(path).open("rb") as raw, zipfile.ZipFile(raw) as zf:
        if f"{key}.npy" not in zf.namelist():
            raise ValueError(f"{path} has no {key!r} array (has {[n[:-4] for n in zf.namelist()]})")
        with zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(
                    f"{path}:{key} uses .npy format {version}; re-save it with a current numpy"
                )
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if fortran:
                raise ValueError(
                    f"{path}:{key} is Fortran-ordered; re-save it with "
                    "np.savez(np.ascontiguousarray(x))"
                )
            yield f, shape, dtype


def count_images(source: str) -> int:
    if storage.path(source).is_dir():
        return len(_image_files(source))
    with _npz_member(source) as (_, shape, _):
        return int(shape[0])


def iter_images(source: str, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches from an image folder (sorted paths) or the ``arr_0`` of an npz,
    streamed."""
    if storage.path(source).is_dir():
        files = _image_files(source)[:limit]
        for start in range(0, len(files), batch_size):
            images = [_read_image(f) for f in files[start:start + batch_size]]
            shapes = {im.shape for im in images}
            if len(shapes) != 1:
                raise ValueError(
                    f"images in {source} have different sizes {sorted(shapes)}; center-crop and "
                    "resize "
                    "them to one size first (ADM center_crop_arr)"
                )
            yield np.stack(images)
        return
    with _npz_member(source) as (f, shape, dtype):
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{source}: arr_0 must be uint8 (N, H, W, 3), got {dtype} {shape}")
        total = shape[0] if limit is None else min(limit, shape[0])
        per_image = int(np.prod(shape[1:]))
        for start in range(0, total, batch_size):
            n = min(batch_size, total - start)
            data = f.read(n * per_image)
            if len(data) != n * per_image:
                raise ValueError(f"{source}: arr_0 is truncated at image {start}")
            yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])


# ---- feature collection --------------------------------------------------------------------------

@dataclasses.dataclass
class FeatureSummary:
    pool: RunningStats
    spatial: RunningStats
    inception_score: InceptionScoreAccumulator
    pool_features: np.ndarray | None  # kept only when asked for (precision/recall)


def collect_features(
    batches,
    extractor: Callable,
    batch_size: int,
    keep_pool_features: bool = False,
    total: int | None = None,
    desc: str = "inception features",
) -> FeatureSummary:
    """Runs every batch through ``extractor`` (e.g. ``InceptionFeatures``) and streams the
    statistics.

    The last batch is zero-padded to ``batch_size`` so the extractor compiles once; padded rows are
    dropped.
    """
    from tqdm.auto import tqdm

    summary = FeatureSummary(
        RunningStats(POOL_DIM), RunningStats(SPATIAL_DIM), InceptionScoreAccumulator(), None
    )
    kept = []
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for images in batches:
            n = len(images)
            if n < batch_size:
                images = np.concatenate(
                    [images, np.zeros((batch_size - n, *images.shape[1:]), images.dtype)]
                )
            out = {k: np.asarray(v)[:n] for k, v in extractor(images).items()}
            summary.pool.update(out["pool"])
            summary.spatial.update(out["spatial"])
            summary.inception_score.update(out["logits_unbiased"])
            if keep_pool_features:
                kept.append(out["pool"].astype(np.float32))
            bar.update(n)
    if keep_pool_features:
        summary.pool_features = (
            np.concatenate(kept) if kept else np.zeros((0, POOL_DIM), np.float32)
        )
    return summary


def compute_reference_batch(source: str, extractor: Callable, batch_size: int = 64,
                            num_stored_images: int = 10_000) -> ReferenceBatch:
    """Statistics over every image of ``source``; the first ``num_stored_images`` are kept as
    ``arr_0``."""
    summary = collect_features(
        iter_images(source, batch_size),
        extractor,
        batch_size,
        total=count_images(source),
        desc=f"reference stats of {os.path.basename(source.rstrip('/'))}",
    )
    stored = None
    if num_stored_images > 0:
        stored = np.concatenate(list(iter_images(source, batch_size, limit=num_stored_images)))
    return ReferenceBatch(FeatureStats(summary.pool.mean(), summary.pool.cov()),
                          FeatureStats(summary.spatial.mean(), summary.spatial.cov()), stored)


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("images", None, "image folder, or .npz whose arr_0 is uint8 (N, H, W, 3)",
                        flag_values=fv, required=True)
    cli_flags.define_inception(fv, required=True)
    cli.define_out(fv, "output ADM-format .npz")
    flags.DEFINE_integer("batch_size", 64, "Inception batch (--batch-size also works)",
                         flag_values=fv)
    flags.DEFINE_integer("store_images", 10_000, "how many images to store as arr_0 for "
                         "precision/recall (ADM: 10000; 0 = none; --store-images also works)",
                         flag_values=fv)
    cli_flags.define_preprocess(fv, "pytorch_fid")


# the argparse spellings of launch scripts written before the flags were absl's
OLD_SPELLINGS = {"batch-size": "batch_size", "store-images": "store_images"}


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(argv, __doc__, _define_flags, OLD_SPELLINGS)

    import jax

    from detailflow_jax.convert.inception import load_inception_params
    from detailflow_jax.nn.inception import InceptionFeatures
    from detailflow_jax.sharding import make_mesh

    mesh = make_mesh((-1, 1, 1)) if jax.device_count() > 1 else None
    extractor = InceptionFeatures(
        load_inception_params(args.inception), mesh=mesh, preprocess=args.preprocess
    )
    ref = compute_reference_batch(args.images, extractor, args.batch_size, args.store_images)
    save_reference_batch(args.out, ref)
    stored = 0 if ref.images is None else len(ref.images)
    print(
        f"wrote {args.out}: mu/sigma ({POOL_DIM}), mu_s/sigma_s ({SPATIAL_DIM}), arr_0 with "
        f"{stored} images"
    )


if __name__ == "__main__":
    cli_errors.run(main)
