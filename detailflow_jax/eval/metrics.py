"""FID / sFID, Inception Score and k-NN precision/recall with the ADM evaluator's conventions.

All statistics are streamed: ``RunningStats`` (mean/covariance) and ``InceptionScoreAccumulator``
take one batch of features at a time in float64, so 50k samples never need to sit in memory as a
whole except for precision/recall, which needs the pool features themselves (50k x 2048 float32 =
400 MB) and computes distances block by block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


class RunningStats:
    """Streaming mean and unbiased covariance (as ``np.mean`` / ``np.cov(rowvar=False)``) in
    float64.

    Sums are taken around a shift (the first batch's mean) so that ``sum(x x^T) - n mu mu^T`` does
    not cancel catastrophically when the features' mean is large compared to their spread.
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum = np.zeros(self.dim, np.float64)
        self._outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features) -> None:
        x = np.asarray(features, np.float64)
        x = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))
        if x.shape[1] != self.dim:
            raise ValueError(
                f"RunningStats({self.dim}) got features with {x.shape[1]} dims (shape {x.shape})"
            )
        if x.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
        x = x - self._shift
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x
        self.count += x.shape[0]

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("RunningStats.mean(): no features were added")
        return self._shift + self._sum / self.count

    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"RunningStats.cov() needs at least 2 samples, got {self.count}")
        centred_mean = self._sum / self.count
        return (self._outer - self.count * np.outer(centred_mean, centred_mean)) / (self.count - 1)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): both square roots are of symmetric PSD
    matrices, so two symmetric eigendecompositions replace scipy's ``sqrtm`` of the non-symmetric
    product (no complex parts, no ``eps`` retry for singular covariances; negative round-off
    eigenvalues are clipped to 0).
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"incompatible statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
            f"{sigma2.shape}; both sides must come from the same feature (pool vs spatial)"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    middle = (middle + middle.T) / 2  # exact symmetry for eigvalsh
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


class InceptionScoreAccumulator:
    """Streaming Inception Score over consecutive splits of ``split_size`` samples (ADM: 5000, 10
    splits at 50k).

    Per split it keeps sum_x p(y|x) and sum_x sum_y p log p, which is all that exp(E_x KL(p(y|x) ||
    p(y))) needs. Feed it ``logits_unbiased`` (pool @ fc.kernel, no bias), as the ADM evaluator
    does.
    """

    def __init__(self, split_size: int = 5000):
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        self.split_size = int(split_size)
        self.count = 0
        self._sum_p: list[np.ndarray] = []
        self._sum_plogp: list[float] = []

    def update(self, logits) -> None:
        logits = np.asarray(logits, np.float64)
        logp = logits - logits.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        p = np.exp(logp)
        plogp = (p * logp).sum(axis=1)
        start = 0
        while start < len(p):
            split, offset = divmod(self.count, self.split_size)
            take = min(self.split_size - offset, len(p) - start)
            if split == len(self._sum_p):
                self._sum_p.append(np.zeros(p.shape[1], np.float64))
                self._sum_plogp.append(0.0)
            self._sum_p[split] += p[start:start + take].sum(axis=0)
            self._sum_plogp[split] += float(plogp[start:start + take].sum())
            self.count += take
            start += take

    def split_scores(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("InceptionScoreAccumulator: no logits were added")
        sizes = [
            min(self.split_size, self.count - i * self.split_size) for i in range(len(self._sum_p))
        ]
        scores = []
        for n, sum_p, sum_plogp in zip(sizes, self._sum_p, self._sum_plogp):
            p_y = sum_p / n
            entropy_of_mean = -(p_y * np.log(np.where(p_y > 0, p_y, 1.0))).sum()
            scores.append(np.exp(sum_plogp / n + entropy_of_mean))
        return np.asarray(scores)

    def result(self) -> float:
        """Mean over splits (the number ADM reports)."""
        return float(self.split_scores().mean())


def inception_score(logits, split_size: int = 5000) -> float:
    acc = InceptionScoreAccumulator(split_size)
    acc.update(logits)
    return acc.result()


# ---- k-NN precision / recall (Kynkäänniemi et al. 2019, as in ADM's ManifoldEstimator) -----------

def _squared_distances(a, b):
    # Same expansion as ADM's _batch_pairwise_distances, clamped at 0 against round-off.
    hp = jax.lax.Precision.HIGHEST
    sq_a = jnp.sum(a * a, axis=1)[:, None]
    sq_b = jnp.sum(b * b, axis=1)[None, :]
    return jnp.maximum(sq_a - 2.0 * jnp.dot(a, b.T, precision=hp) + sq_b, 0.0)


@functools.partial(jax.jit, static_argnames="count")
def _block_smallest(rows, cols, col_valid, count: int):
    d = jnp.where(col_valid[None, :], _squared_distances(rows, cols), jnp.inf)
    return -jax.lax.top_k(-d, count)[0]


@jax.jit
def _block_inside(rows, row_radii, cols, col_radii):
    """(rows inside any column ball, columns inside any row ball); padded entries carry radius -1
    (never inside)."""
    d = _squared_distances(rows, cols)
    return jnp.any(d <= col_radii[None, :], axis=1), jnp.any(d <= row_radii[:, None], axis=0)


def _blocks(features: np.ndarray, block_size: int):
    """Yields (start, block padded to block_size, number of real rows) so every jitted call has one
    shape."""
    for start in range(0, len(features), block_size):
        block = features[start:start + block_size]
        n = len(block)
        if n < block_size:
            block = np.concatenate([block, np.zeros((block_size - n, block.shape[1]), block.dtype)])
        yield start, block, n


def _as_features(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(
            f"{name}: expected a (N, D) feature matrix with N >= 2, got shape {x.shape}"
        )
    return x


def manifold_radii(features, k: int = 3, block_size: int = 4096) -> np.ndarray:
    """Squared distance of every feature to its k-th nearest neighbour in the same set (itself
    excluded)."""
    features = _as_features(features, "manifold_radii")
    if len(features) <= k:
        raise ValueError(f"manifold_radii: k={k} needs more than k features, got {len(features)}")
    block_size = min(block_size, len(features))
    count = min(k + 1, block_size)
    radii = np.empty(len(features), np.float32)
    for start, rows, n in _blocks(features, block_size):
        candidates = []
        for _, cols, m in _blocks(features, block_size):
            valid = np.arange(block_size) < m
            candidates.append(np.asarray(_block_smallest(rows, cols, valid, count)))
        # The k+1 smallest over all columns are among the union of each block's k+1 smallest; index
        # 0 is self.
        radii[start:start + n] = np.sort(np.concatenate(candidates, axis=1), axis=1)[:n, k]
    return radii


def precision_recall(
    real_features, fake_features, k: int = 3, block_size: int = 4096
) -> tuple[float, float]:
    """(precision, recall): the fraction of fake samples inside some real sample's k-NN ball, and
    vice versa.

    A point is inside a ball when its squared distance is <= the ball's squared radius (ADM uses
    ``<=``). ADM computes distances in float16 with a float32 fallback; here they are float32
    throughout.
    """
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape} vs fake {fake.shape}")
    real_radii = manifold_radii(real, k, block_size)
    fake_radii = manifold_radii(fake, k, block_size)
    block_size = min(block_size, max(len(real), len(fake)))

    def padded_radii(radii, start):
        out = np.full(block_size, -1.0, np.float32)
        chunk = radii[start:start + block_size]
        out[:len(chunk)] = chunk
        return out

    real_inside = np.zeros(len(real), bool)
    fake_inside = np.zeros(len(fake), bool)
    for r_start, r_block, r_n in _blocks(real, block_size):
        r_radii = padded_radii(real_radii, r_start)
        for f_start, f_block, f_n in _blocks(fake, block_size):
            r_in, f_in = _block_inside(r_block, r_radii, f_block, padded_radii(fake_radii, f_start))
            real_inside[r_start:r_start + r_n] |= np.asarray(r_in)[:r_n]
            fake_inside[f_start:f_start + f_n] |= np.asarray(f_in)[:f_n]
    return float(fake_inside.mean()), float(real_inside.mean())
