"""Quality of generated Fashion-MNIST images, judged by the classifier of ``eval/classifier``.

For each set of images with the class each was meant to show, two figures:

* accuracy: how often the classifier assigns the requested class (class fidelity);
* Fréchet distance between the classifier's penultimate features of the set and of real held-out
  images (the FID recipe with a Fashion-MNIST feature space instead of Inception's: it sees blur,
  artefacts and missing diversity).

The real test split is cut into two interleaved halves: the even images are the *reference* every
set is compared with, the odd images form the "real test images (held-out half)" row, the noise
floor a perfect generator would reach at that sample size. Reconstruct the held-out half
(``split_real(...)[1]``) for the tokenizer row, so that it, too, is compared with images it was not
made from. Fréchet distances shrink with more samples: compare rows of similar ``count``.

    report = quality_report(params, {"tokenizer reconstructions": (recon, labels), "GPT samples": (x, y)},
                            test_images, test_labels, classifier_accuracy=info["test_accuracy"],
                            path=os.path.join(workdir, "quality.json"))
"""  # noqa: E501

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from detailflow_jax import storage
from detailflow_jax.eval.classifier import FEATURE_DIM, classify
from detailflow_jax.eval.metrics import RunningStats, frechet_distance

REAL_ROW = "real test images (held-out half)"


def score_images(classifier_params: Any, images, labels) -> dict[str, Any]:
    """{"accuracy": fraction classified as ``labels``, "features": (K, FEATURE_DIM) float32,
    "count": K}.

    ``images``: (K, 32, 32, 3) uint8 or float in [-1, 1]; ``labels``: (K,) requested classes."""
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(
            f"labels must have shape ({len(images)},), one requested class per image; got "
            f"{labels.shape}"
        )
    out = classify(classifier_params, images)
    return {
        "accuracy": float(np.mean(out["logits"].argmax(-1) == labels)),
        "features": out["features"],
        "count": len(labels),
    }


def feature_stats(features) -> RunningStats:
    stats = RunningStats(FEATURE_DIM)
    stats.update(features)
    return stats


def features_frechet_distance(features, reference: RunningStats) -> float:
    """Fréchet distance between the Gaussian fitted to ``features`` (K >= 2) and the ``reference``
    statistics."""
    if len(features) < 2:
        raise ValueError(
            f"a Fréchet distance needs at least 2 images (for a covariance), got {len(features)}"
        )
    stats = feature_stats(features)
    return frechet_distance(stats.mean(), stats.cov(), reference.mean(), reference.cov())


def split_real(
    images, labels
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((reference images, labels), (held-out images, labels)): the even and the odd images of the
    real set."""
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) < 4 or labels.shape != (len(images),):
        raise ValueError(
            f"need at least 4 real images with one label each, got images {images.shape} and "
            "labels "
            f"{labels.shape}"
        )
    return (images[0::2], labels[0::2]), (images[1::2], labels[1::2])


def quality_report(
    classifier_params: Any,
    rows: Mapping[str, tuple[Any, Any]],
    real_images,
    real_labels,
    *,
    classifier_accuracy: float | None = None,
    path: str | os.PathLike | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """Scores every ``rows[name] = (images, requested labels)`` against the real reference half,
    after the real held-out half itself; prints the table (``echo``), writes the report as JSON to
    ``path``, and returns it:

    {"classifier": {"test_accuracy", "feature_dim"}, "reference": {"count"},
     "rows": {name: {"accuracy", "frechet_distance", "count"}}}  (the real row first, then ``rows`` in order)
    """  # noqa: E501
    if REAL_ROW in rows:
        raise ValueError(
            f"row name {REAL_ROW!r} is reserved for the real held-out half; rename that row"
        )
    (ref_images, _), held_out = split_real(real_images, real_labels)
    reference = feature_stats(classify(classifier_params, ref_images)["features"])
    table = {}
    for name, (images, labels) in {REAL_ROW: held_out, **rows}.items():
        scores = score_images(classifier_params, images, labels)
        table[name] = {"accuracy": scores["accuracy"],
                       "frechet_distance": features_frechet_distance(scores["features"], reference),
                       "count": scores["count"]}
    report = {"classifier": {"test_accuracy": classifier_accuracy, "feature_dim": FEATURE_DIM},
              "reference": {"count": reference.count}, "rows": table}
    if path is not None:
        storage.write_json(path, report, indent=2)
    if echo:
        print(format_table(report), flush=True)
    return report


def format_table(report: Mapping[str, Any]) -> str:
    """The report as an aligned text table with a header line naming the classifier and the
    reference."""
    accuracy = report["classifier"]["test_accuracy"]
    classifier = (
        f"{100 * accuracy:.2f}% held-out accuracy"
        if accuracy is not None
        else "held-out accuracy unknown"
    )
    header = (
        f"Fashion-MNIST quality (classifier: {classifier}; Fréchet distance of its "
        f"{report['classifier']['feature_dim']}-d features vs {report['reference']['count']} real "
        "test images)"
    )
    names = list(report["rows"])
    width = max(len(n) for n in names + ["images"])
    lines = [
        header,
        f"{'images':<{width}}  {'accuracy':>8}  {'Fréchet distance':>16}  {'count':>6}",
    ]
    for name in names:
        row = report["rows"][name]
        lines.append(
            f"{name:<{width}}  {100 * row['accuracy']:>7.2f}%  {row['frechet_distance']:>16.3f}  "
            f"{row['count']:>6}"
        )
    return "\n".join(lines)
