"""Tokenizer evaluation: SSIM (against an independent scipy version of skimage's algorithm), the
coarse-to-fine curve over the admissible token counts, the keep-mask batching and the command end to
end (tiny random tokenizer, synthetic images, the fixture FID Inception)."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from detailflow_jax.eval import ssim as ssim_lib
from detailflow_jax.eval import tokenizer_eval
from detailflow_jax.inference.reconstruction import ReconstructionEvaluator

sys.path.insert(0, ".")


def _smooth_images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.uniform(size=(n, size, size, 3)), sigma=(0, 2, 2, 0)).astype(
        np.float32
    )


def _skimage_ssim(a, b, s: ssim_lib.SSIMSettings):
    """skimage.metrics.structural_similarity(a, b, channel_axis=-1, ...) re-derived with scipy:
    filter every channel (reflect mode), combine, crop (win - 1) // 2 from the borders, average."""
    if s.window == "gaussian":
        filt = lambda x: ndimage.gaussian_filter(x, s.sigma, truncate=3.5, mode="reflect")  # noqa: E731
    else:
        filt = lambda x: ndimage.uniform_filter(x, s.win_size, mode="reflect")  # noqa: E731
    n = s.win_size ** 2
    norm = n / (n - 1) if s.sample_covariance else 1.0
    values = []
    for c in range(a.shape[-1]):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        ux, uy = filt(x), filt(y)
        vx, vy, vxy = (
            norm * (filt(x * x) - ux * ux),
            norm * (filt(y * y) - uy * uy),
            norm * (filt(x * y) - ux * uy),
        )
        c1, c2 = (s.k1 * s.data_range) ** 2, (s.k2 * s.data_range) ** 2
        smap = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
        pad = (s.win_size - 1) // 2
        values.append(smap[pad:-pad, pad:-pad].mean())
    return np.mean(values)


@pytest.mark.parametrize(
    "settings", [ssim_lib.STANDARD, ssim_lib.OFFICIAL], ids=["standard", "official"]
)
def test_ssim_matches_the_skimage_algorithm(settings):
    clean = _smooth_images(2)
    noisy = np.clip(clean + np.random.default_rng(1).normal(0, 0.05, clean.shape), 0, 1).astype(
        np.float32
    )
    ours = np.asarray(ssim_lib.ssim(clean, noisy, settings))
    expected = [_skimage_ssim(clean[i], noisy[i], settings) for i in range(2)]
    np.testing.assert_allclose(ours, expected, atol=2e-5)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    clean = _smooth_images(1)
    rng = np.random.default_rng(2)
    noisy = [np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 1).astype(np.float32)
             for sigma in (0.0, 0.02, 0.1, 0.3)]
    scores = [float(ssim_lib.ssim(clean, x)[0]) for x in noisy]
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert scores[0] > scores[1] > scores[2] > scores[3]
    # data_range=2 (the official call) makes the constants 4x larger, so the same noise scores
    # higher.
    noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    loose = ssim_lib.SSIMSettings(data_range=2.0)
    assert float(ssim_lib.ssim(clean, noisy, loose)[0]) > float(ssim_lib.ssim(clean, noisy)[0])


def test_keep_mask_drops_padding_and_stops_at_num_images():
    from detailflow_jax.sharding import make_mesh
    mesh = make_mesh((-1, 1, 1))
    stream = [
        {"image": np.ones((8, 16, 16, 3), np.float32)},
        {"image": np.ones((3, 16, 16, 3), np.float32)},
    ]
    out = list(tokenizer_eval.padded_global_batches(stream, 8, mesh))
    assert [x.shape for x, _ in out] == [(8, 16, 16, 3)] * 2
    assert [int(k.sum()) for _, k in out] == [8, 3] and out[1][1][:3].all()
    limited = list(tokenizer_eval.padded_global_batches(stream, 8, mesh, num_images=5))
    assert len(limited) == 1 and int(limited[0][1].sum()) == 5


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from configs import tokenizer as tokenizer_configs
    from detailflow_jax.tokenizer.model import init_params
    cfg = tokenizer_configs.model_config("tiny")  # 64 px, N = 32, g = C = 4
    return cfg, jax.jit(lambda key: init_params(cfg, key))(jax.random.key(0))


def test_curve_covers_every_admissible_token_count(tiny_tokenizer):
    cfg, params = tiny_tokenizer
    evaluator = ReconstructionEvaluator(cfg)
    images = jax.random.uniform(jax.random.key(1), (8, 64, 64, 3), minval=-1, maxval=1)
    keep = np.arange(8) < 6
    rows, noisy = tokenizer_eval.evaluate_tokenizer(evaluator, params, [(images, keep)],
                                                    progress=False)
    assert noisy == []
    assert (
        [r["tokens"] for r in rows]
        == evaluator.tables.token_counts
        == [1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32]
    )
    assert [r["canvas"] for r in rows] == [
        evaluator.tables.canvas[t] for t in evaluator.tables.token_counts
    ]
    full = rows[-1]
    psnr = np.asarray(
        evaluator.decode_and_score(params, evaluator.encode(params, images), images, 64, 32)[0]
    )
    assert full["psnr"] == pytest.approx(float(psnr[:6].mean()), rel=1e-5)  # padding rows excluded
    assert all(np.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1 and r["rfid"] is None for r in rows)
    with pytest.raises(ValueError, match="not admissible"):
        tokenizer_eval.evaluate_tokenizer(
            evaluator, params, [(images, keep)], counts=[5], progress=False
        )


def test_command_end_to_end(tiny_tokenizer, tmp_path, large_fixtures, capsys):
    from detailflow_jax.params_io import save_params
    cfg, params = tiny_tokenizer
    save_params(tmp_path / "tok", params)
    inception = large_fixtures / "fid_inception" / "inception_state_dict_fp16.npz"
    out = tmp_path / "eval"
    rows, noisy = tokenizer_eval.main(
        [
            "--tokenizer",
            str(tmp_path / "tok"),
            "--tokenizer_config",
            "configs/tokenizer.py:tiny",
            "--data",
            "synthetic",
            "--image_size",
            "64",
            "--inception",
            str(inception),
            "--out",
            str(out),
            "--num_images",
            "6",
            "--batch_size",
            "8",
            "--token_counts",
            "4,32",
            "--official_ssim",
            "--noisy_eval",
        ]
    )
    printed = capsys.readouterr().out
    assert "tokens  canvas" in printed and "data_range=2.0" in printed
    assert "noise_idx  tokens  canvas" in printed

    saved = json.loads((out / "tokenizer_eval.json").read_text())
    assert saved["curve"] == rows and [r["tokens"] for r in rows] == [4, 32]
    assert saved["noisy"] == noisy and saved["settings"]["noisy_eval"]
    # N = 32, g = C = 4: M = 8 groups; inside the causal prefix the noise covers one token.
    assert [r["noise_idx"] for r in noisy] == [-1, 0, 8, 16, 24, 28]
    assert [r["noise_end"] for r in noisy] == [None, 1, 12, 20, 28, 32]
    clean = {k: v for k, v in noisy[0].items() if k in ("psnr", "ssim", "rfid")}
    assert clean == {k: rows[1][k] for k in clean}  # noise at -1: the clean all-token row
    for r in noisy[1:]:
        assert r["rfid"] > 0 and np.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1 and r["tokens"] == 32
    with Image.open(out / "tokenizer_noisy.png") as png:
        assert png.size == (3 * 380, 324)
    assert saved["settings"]["num_images"] == 6 and saved["settings"]["official_ssim"]
    assert "data_range=2.0" in saved["ssim_note"]
    for r in rows:
        assert r["rfid"] > 0 and np.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1
    with Image.open(out / "tokenizer_curve.png") as png:
        assert png.size == (3 * 380, 324)
        colours = np.unique(np.asarray(png.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 3  # curves in colour, not only black axes on white


@pytest.mark.parametrize("n,g", [(32, 4), (128, 8), (256, 8), (512, 8), (64, 16), (16, 8)])
def test_noisy_eval_indices_follow_the_official_formula(n, g):
    m = n // g
    official = [-1] + [i * g for i in [0, m // 4, m // 4 * 2, m // 4 * 3, m - 1]]
    assert tokenizer_eval.noisy_eval_indices(n, g) == list(dict.fromkeys(official))
    assert tokenizer_eval.noisy_eval_indices(128, 8) == [-1, 0, 32, 64, 96, 120]
    assert tokenizer_eval.noisy_eval_indices(16, 8) == [-1, 0, 8]  # M = 2: the repeated 0 once


def test_noisy_encode_keeps_the_prefix_and_perturbs_from_the_noise_index(tiny_tokenizer):
    cfg, params = tiny_tokenizer
    evaluator = ReconstructionEvaluator(cfg)
    codebook = np.asarray(evaluator.model.apply(
        {"params": params}, jnp.arange(cfg.codebook_size)[None],
        method=lambda m, c: m.quantizer.lookup(c)))[0]

    def codes(quant):  # straight-through quant = its codebook row to a few ulp; rows are far apart
        return np.argmin(((np.asarray(quant)[..., None, :] - codebook) ** 2).sum(-1), axis=-1)

    images = jax.random.uniform(jax.random.key(3), (8, 64, 64, 3), minval=-1, maxval=1)
    clean = codes(evaluator.encode(params, images))
    key = jax.random.key(4)
    np.testing.assert_array_equal(codes(evaluator.encode_noisy(params, images, -1, 0, key)), clean)
    for start, end in [(0, 1), (8, 12), (28, 32)]:
        noisy = codes(evaluator.encode_noisy(params, images, np.int32(start), np.int32(end), key))
        np.testing.assert_array_equal(noisy[:, :start], clean[:, :start])  # clean prefix kept
        # Random codes from the top-50 of 64 rarely hit the nearest one.
        assert (noisy[:, start:end] != clean[:, start:end]).mean() > 0.5
    with pytest.raises(ValueError, match="outside"):
        tokenizer_eval.evaluate_tokenizer(evaluator, params, [(images, np.ones(8, bool))],
                                          counts=[32], noise_idxs=[32], progress=False)
