"""FID / IS / precision-recall maths, streaming statistics and the ADM reference-batch format."""

import numpy as np
import pytest

from detailflow_jax.eval import reference_stats as rs
from detailflow_jax.eval.metrics import (InceptionScoreAccumulator, RunningStats, frechet_distance,
                                         inception_score, manifold_radii, precision_recall)


def _random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


# ---- streaming statistics ------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_running_stats_equal_numpy(offset):
    rng = np.random.default_rng(0)
    batches = [offset + rng.normal(size=(n, 6)).astype(np.float32) for n in (5, 1, 17, 0, 9)]
    stats = RunningStats(6)
    for b in batches:
        stats.update(b)
    allx = np.concatenate(batches).astype(np.float64)
    assert stats.count == len(allx)
    np.testing.assert_allclose(stats.mean(), allx.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(allx, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="dims"):
        stats.update(np.zeros((2, 5)))


# ---- Fréchet distance ----------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 64)) * rng.uniform(0.1, 3.0, size=64)
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_fid_closed_form_for_commuting_covariances():
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    a, b = rng.uniform(0.0, 4.0, 32), rng.uniform(0.0, 4.0, 32)
    # singular covariance: no NaN, no eps retry (sqrt of round-off-sized eigenvalues ~1e-8 each)
    a[:5] = 0.0
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-6)


def test_fid_matches_scipy_sqrtm_on_random_features():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    x, y = (
        rng.normal(size=(400, 48)),
        rng.normal(size=(300, 48)) @ rng.normal(size=(48, 48)) * 0.3 + 0.5,
    )
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-8)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="incompatible"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(5), np.eye(5))


# ---- Inception Score -----------------------------------------------------------------------------

def _adm_inception_score(logits, split_size):
    """The ADM evaluator's formula, on softmax probabilities."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def test_inception_score_of_uniform_logits_is_one():
    assert inception_score(np.zeros((100, 1008)), split_size=30) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_confident_distinct_classes_is_the_class_count():
    logits = np.full((40, 1008), -1e4)
    logits[np.arange(40), np.arange(40) % 10] = 0.0  # each split of 20 covers 10 classes evenly
    assert inception_score(logits, split_size=20) == pytest.approx(10.0, rel=1e-9)


def test_streamed_inception_score_matches_adm_formula():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(230, 50)) * 3
    acc = InceptionScoreAccumulator(split_size=100)  # splits of 100, 100, 30
    for start in range(0, 230, 37):  # chunks that straddle the split boundaries
        acc.update(logits[start:start + 37])
    assert len(acc.split_scores()) == 3
    np.testing.assert_allclose(acc.result(), _adm_inception_score(logits, 100), rtol=1e-10)


# ---- precision / recall --------------------------------------------------------------------------

def _line(xs):
    return np.stack([np.asarray(xs, np.float32), np.zeros(len(xs), np.float32)], axis=1)


def test_precision_recall_identical_and_far_apart_sets():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 16)).astype(np.float32)
    assert precision_recall(x, x, block_size=16) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0, block_size=16) == (0.0, 0.0)


def test_precision_recall_hand_computed_line():
    """Real points 0..7 on a line, k=3: squared radii 9 at both ends, 4 inside.

    Fake points: 3.5 (inside), 9.9 (8.41 <= 9 from 7: inside), 11 (16 > 9: outside), -3 (exactly 9
    from 0: inside, ADM counts the boundary). Every fake ball (radius = distance to the farthest
    other fake) covers all real points.
    """
    real, fake = _line(range(8)), _line([3.5, 9.9, 11.0, -3.0])
    np.testing.assert_array_equal(manifold_radii(real, k=3), [9, 4, 4, 4, 4, 4, 4, 9])
    assert precision_recall(real, fake, k=3) == (0.75, 1.0)
    assert precision_recall(fake, real, k=3) == (1.0, 0.75)


def test_precision_recall_matches_brute_force_for_any_block_size():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(50, 8)).astype(np.float32)
    fake = (rng.normal(size=(37, 8)) * 1.3 + 0.4).astype(np.float32)

    def brute(a, b, k=3):
        d_aa = ((a[:, None] - a[None]) ** 2).sum(-1)
        d_bb = ((b[:, None] - b[None]) ** 2).sum(-1)
        d_ab = ((a[:, None] - b[None]) ** 2).sum(-1)
        ra, rb = np.sort(d_aa, 1)[:, k], np.sort(d_bb, 1)[:, k]
        return (d_ab <= ra[:, None]).any(0).mean(), (d_ab <= rb[None]).any(1).mean()

    expected = brute(real.astype(np.float64), fake.astype(np.float64))
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for block_size in (7, 16, 4096):
        np.testing.assert_allclose(precision_recall(real, fake, block_size=block_size), expected)


# ---- ADM reference-batch format ------------------------------------------------------------------

def test_reference_batch_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    ref = rs.ReferenceBatch(rs.FeatureStats(rng.normal(size=8), _random_cov(rng, 8)),
                            rs.FeatureStats(rng.normal(size=5), _random_cov(rng, 5)),
                            rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8))
    rs.save_reference_batch(tmp_path / "ref.npz", ref)
    with np.load(tmp_path / "ref.npz") as data:
        assert sorted(data.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    back = rs.load_reference_batch(tmp_path / "ref.npz", with_images=True)
    for a, b in (
        (back.pool.mu, ref.pool.mu),
        (back.pool.sigma, ref.pool.sigma),
        (back.spatial.mu, ref.spatial.mu),
        (back.spatial.sigma, ref.spatial.sigma),
        (back.images, ref.images),
    ):
        np.testing.assert_array_equal(a, b)
    assert rs.load_reference_batch(tmp_path / "ref.npz").images is None
    np.savez(tmp_path / "bad.npz", arr_0=ref.images)
    with pytest.raises(ValueError, match="missing"):
        rs.load_reference_batch(tmp_path / "bad.npz")


@pytest.mark.parametrize("source", ["npz", "compressed_npz", "folder"])
def test_image_sources_stream_in_batches(tmp_path, source):
    from PIL import Image

    images = np.random.default_rng(8).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    if source == "folder":
        path = tmp_path / "imgs"
        (path / "sub").mkdir(parents=True)
        for i, im in enumerate(images):
            Image.fromarray(im).save(path / ("sub" if i % 2 else "") / f"{i:03d}.png")
        images = images[np.argsort([f"{'sub/' if i % 2 else ''}{i:03d}" for i in range(7)])]
    else:
        path = tmp_path / "imgs.npz"
        (np.savez_compressed if source == "compressed_npz" else np.savez)(path, arr_0=images)
    batches = list(rs.iter_images(str(path), batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert rs.count_images(str(path)) == 7
    np.testing.assert_array_equal(
        np.concatenate(list(rs.iter_images(str(path), 4, limit=5))), images[:5]
    )


def test_collect_features_streams_statistics():
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (11, 2, 2, 3), dtype=np.uint8)
    proj_pool, proj_spatial = rng.normal(size=(12, 2048)), rng.normal(size=(12, 2023))
    calls = []

    # linear features of the pixels, so the expected statistics are exact
    def fake_extractor(batch):
        calls.append(len(batch))
        flat = batch.reshape(len(batch), -1).astype(np.float64) / 255
        return {
            "pool": flat @ proj_pool,
            "spatial": flat @ proj_spatial,
            "logits_unbiased": flat[:, :10] * 5,
        }

    batches = (images[i:i + 4] for i in range(0, 11, 4))
    summary = rs.collect_features(
        batches, fake_extractor, batch_size=4, keep_pool_features=True, total=11
    )
    assert calls == [4, 4, 4]  # last batch padded: one compiled shape
    flat = images.reshape(11, -1).astype(np.float64) / 255
    np.testing.assert_allclose(
        summary.pool.mean(), (flat @ proj_pool).mean(0), rtol=1e-10, atol=1e-10
    )
    np.testing.assert_allclose(
        summary.spatial.cov(), np.cov(flat @ proj_spatial, rowvar=False), rtol=1e-8, atol=1e-8
    )
    np.testing.assert_allclose(summary.pool_features, flat @ proj_pool, rtol=1e-6)
    np.testing.assert_allclose(
        summary.inception_score.result(), inception_score(flat[:, :10] * 5), rtol=1e-12
    )
