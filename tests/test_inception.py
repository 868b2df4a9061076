"""FID Inception-v3: parity with pytorch-fid, the reference resize, weight import and the
reference-stats CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.convert.inception import (
    convert_state_dict,
    load_inception_params,
    main as convert_main,
)
from detailflow_jax.convert.state_dict import ConversionError, load_state_dict
from detailflow_jax.eval import reference_stats
from detailflow_jax.nn.inception import SPATIAL_DIM, InceptionFeatures, resize_bilinear
from detailflow_jax.sharding import make_mesh


@pytest.fixture(scope="module")
def fixture_files(large_fixtures):
    folder = large_fixtures / "fid_inception"
    return folder / "inception_state_dict_fp16.npz", folder / "inception_io.npz"


@pytest.fixture(scope="module")
def params(fixture_files):
    return load_inception_params(fixture_files[0])


@pytest.fixture(scope="module")
def extractor(params):
    return InceptionFeatures(params)


def _nhwc(io, name):
    return io[f"{name}_images_uint8_nchw"].transpose(0, 2, 3, 1)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["noise64", "smooth256"])
def test_matches_pytorch_fid(extractor, fixture_files, name):
    io = np.load(fixture_files[1])
    out = jax.tree.map(np.asarray, extractor(_nhwc(io, name)))
    for key, ref in (("pool", io[f"{name}_pool3"]), ("logits", io[f"{name}_logits"])):
        # Tolerance from the fixture README.
        np.testing.assert_allclose(
            out[key], ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max(), err_msg=key
        )
    # post-ReLU activations
    assert out["spatial"].shape == (4, SPATIAL_DIM) and out["spatial"].min() >= 0
    np.testing.assert_allclose(
        out["logits"] - out["logits_unbiased"],
        np.broadcast_to(extractor.params["fc"]["bias"], (4, 1008)),
        atol=1e-4,
    )


@pytest.mark.parity
def test_sharded_batch_matches_single_device(extractor, params, fixture_files):
    """A 4-image batch on an 8-way data mesh is padded, sharded and gives the single-device
    features."""
    io = np.load(fixture_files[1])
    images = _nhwc(io, "noise64")
    sharded = InceptionFeatures(params, mesh=make_mesh((-1, 1, 1)))(images)
    assert sharded["pool"].shape == (4, 2048)
    np.testing.assert_allclose(np.asarray(sharded["pool"]), io["noise64_pool3"], rtol=2e-4,
                               atol=2e-4 * np.abs(io["noise64_pool3"]).max())


def _torch_bilinear_1d(x, out_size):
    """Independent scalar transcription of PyTorch's upsample_bilinear2d index maths
    (align_corners=False)."""
    in_size = len(x)
    scale = in_size / out_size
    out = np.empty(out_size)
    for i in range(out_size):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = int(src)
        i1 = i0 + 1 if i0 < in_size - 1 else i0
        lam = src - i0
        out[i] = (1 - lam) * x[i0] + lam * x[i1]
    return out


@pytest.mark.parametrize("in_hw", [(256, 256), (64, 64), (13, 40), (512, 300)])
def test_resize_is_torch_bilinear(in_hw):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(1, *in_hw, 2)).astype(np.float32)
    ours = np.asarray(resize_bilinear(jnp.asarray(x), 299))
    expected = np.apply_along_axis(_torch_bilinear_1d, 1, x.astype(np.float64), 299)
    expected = np.apply_along_axis(_torch_bilinear_1d, 2, expected, 299)
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    if in_hw[0] <= 299 and in_hw[1] <= 299:
        # Upsampling: jax.image.resize without antialias is the same interpolation, but its fp32
        # weight maths is off by ~1e-5 (ours by ~1e-7), which is why the resize is an explicit
        # matrix.
        ref = jax.image.resize(jnp.asarray(x), (1, 299, 299, 2), "linear", antialias=False)
        np.testing.assert_allclose(ours, np.asarray(ref), atol=5e-5)


def test_tf1_legacy_resize():
    """TF1 resize_bilinear (half_pixel_centers=False): src = dst * in / out, upper neighbour
    clamped."""
    x = jnp.asarray([[0.0, 10.0]]).reshape(1, 1, 2, 1).repeat(2, axis=1)
    out = np.asarray(resize_bilinear(x, 4, half_pixel=False))
    np.testing.assert_allclose(out[0, 0, :, 0], [0.0, 5.0, 10.0, 10.0])


def test_extractor_rejects_float_images(extractor):
    with pytest.raises(ValueError, match="uint8"):
        extractor(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        extractor(np.zeros((1, 3, 32, 32), np.uint8))


def test_conversion_names_missing_and_unexpected_keys(fixture_files):
    state = load_state_dict(fixture_files[0])
    del state["Mixed_6d.branch1x1.bn.running_var"]
    state["Mixed_9z.conv.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(
        ConversionError, match=r"Mixed_6d\.branch1x1\.bn\.running_var(.|\n)*Mixed_9z\.conv\.weight"
    ):
        convert_state_dict(state)


def test_pth_that_is_not_a_checkpoint_explains(tmp_path):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    path.write_bytes(b"not a real checkpoint")
    with pytest.raises(ConversionError, match="not a PyTorch checkpoint"):
        load_inception_params(path)


def test_convert_cli_and_reference_stats_cli(tmp_path, fixture_files, params, extractor):
    """State dict -> orbax (convert CLI) -> reference statistics of a 5-image npz (reference_stats
    CLI)."""
    orbax_dir = tmp_path / "inception"
    convert_main(["--checkpoint", str(fixture_files[0]), "--out", str(orbax_dir)])
    restored = load_inception_params(orbax_dir)
    jax.tree.map(np.testing.assert_array_equal, restored, params)

    # Shapes reuse executables compiled above: 4 x 64 px images, padded to batches of 8 on the
    # 8-device mesh.
    images = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", arr_0=images)
    out = tmp_path / "ref.npz"
    reference_stats.main(
        [
            "--images",
            str(tmp_path / "images.npz"),
            "--inception",
            str(orbax_dir),
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--store-images",
            "3",
        ]
    )
    ref = reference_stats.load_reference_batch(out, with_images=True)
    feats = jax.tree.map(np.asarray, extractor(images))
    np.testing.assert_allclose(ref.pool.mu, feats["pool"].mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        ref.spatial.sigma, np.cov(feats["spatial"], rowvar=False), rtol=1e-3, atol=1e-4
    )
    np.testing.assert_array_equal(ref.images, images[:3])
