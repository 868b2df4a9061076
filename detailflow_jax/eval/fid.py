"""Generation metrics of one sample set against an ADM reference batch: IS, FID, sFID, precision and
recall.

Built from the streaming pieces of ``metrics`` and ``reference_stats``: the samples' Inception
features are reduced batch by batch (``collect_features``); only the pool features needed for
precision/recall are kept. The reference side is an ADM reference batch
(``VIRTUAL_imagenet256_labeled.npz``): ``mu``/``sigma`` and ``mu_s``/``sigma_s`` for FID/sFID, and
the ``arr_0`` images (streamed, never loaded whole) for precision/recall.
"""

from __future__ import annotations

import os
import time
import zipfile
from typing import Callable, Iterable

import numpy as np

from detailflow_jax import storage
from detailflow_jax.eval.metrics import RunningStats, frechet_distance, precision_recall
from detailflow_jax.eval.reference_stats import (
    FeatureSummary,
    ReferenceBatch,
    collect_features,
    count_images,
    iter_images,
    load_reference_batch,
)

PR_NEIGHBOURS = 3  # ADM's ManifoldEstimator nhood_sizes=(3,)


def reference_has_images(path: str | os.PathLike) -> bool:
    """Whether an ADM reference npz stores ``arr_0`` images (needed for precision/recall); reads
    only the index."""
    with storage.path(path).open("rb") as raw, zipfile.ZipFile(raw) as zf:
        return "arr_0.npy" in zf.namelist()


def reference_pool_features(
    path: str | os.PathLike, extractor: Callable, batch_size: int
) -> np.ndarray:
    """Pool features (N, 2048) of the reference batch's ``arr_0`` images, streamed from the npz."""
    path = os.fspath(path)
    summary = collect_features(
        iter_images(path, batch_size),
        extractor,
        batch_size,
        keep_pool_features=True,
        total=count_images(path),
        desc="reference images (precision/recall)",
    )
    return summary.pool_features


def fid_between(a: RunningStats, b: RunningStats) -> float:
    """Fréchet distance between two streamed feature distributions."""
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


def evaluate_features(samples: FeatureSummary, reference: ReferenceBatch,
                      reference_pool: np.ndarray | None = None) -> dict:
    """{inception_score, fid, sfid, precision, recall, num_samples} of streamed sample features vs a
    reference.

    ``reference_pool`` are the reference images' pool features; without them precision and recall
    are None. With them, ``samples.pool_features`` must have been kept
    (``collect_features(keep_pool_features=True)``).
    """
    if samples.pool.count < 2:
        raise ValueError(f"need at least 2 samples for FID, got {samples.pool.count}")
    out = {
        "num_samples": samples.pool.count,
        "inception_score": samples.inception_score.result(),
        "fid": frechet_distance(
            samples.pool.mean(), samples.pool.cov(), reference.pool.mu, reference.pool.sigma
        ),
        "sfid": frechet_distance(
            samples.spatial.mean(),
            samples.spatial.cov(),
            reference.spatial.mu,
            reference.spatial.sigma,
        ),
        "precision": None,
        "recall": None,
    }
    if reference_pool is not None:
        if samples.pool_features is None:
            raise ValueError("precision/recall need the samples' pool features: collect them with "
                             "keep_pool_features=True")
        out["precision"], out["recall"] = precision_recall(
            reference_pool, samples.pool_features, k=PR_NEIGHBOURS
        )
    return out


def evaluate_samples(
    batches: Iterable[np.ndarray],
    extractor: Callable,
    reference_path: str | os.PathLike,
    batch_size: int,
    total: int | None = None,
    log: Callable[[str], None] = print,
    timings: dict | None = None,
) -> dict:
    """Streams uint8 sample batches through ``extractor`` and scores them against the ADM reference
    batch.

    Precision/recall are skipped (None, with a printed note) when the reference npz has no ``arr_0``
    images. ``timings``, when given, receives ``samples_seconds`` (the samples' feature pass,
    including compilation).
    """
    with_images = reference_has_images(reference_path)
    start = time.perf_counter()
    samples = collect_features(
        batches,
        extractor,
        batch_size,
        keep_pool_features=with_images,
        total=total,
        desc="inception features (samples)",
    )
    if timings is not None:
        timings["samples_seconds"] = time.perf_counter() - start
    reference = load_reference_batch(reference_path)
    reference_pool = None
    if with_images:
        reference_pool = reference_pool_features(reference_path, extractor, batch_size)
    else:
        log(f"note: {reference_path} has no arr_0 images, so precision and recall are skipped")
    return evaluate_features(samples, reference, reference_pool)
