"""torch-exact area / bicubic resizing (nn/resample.py) against the official degradation targets."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.nn.resample import area_resize, bicubic_resize


def _targets(io, prefix, table):
    for key in io.files:
        if key.startswith(prefix):
            t = key[len(prefix):]
            yield key, table["token2res"][t], table["token2dec_out_res"][t]


@pytest.mark.parity
def test_area_then_bicubic_reproduces_degradation_targets(parity_folder):
    cfg = json.loads((parity_folder / "config.json").read_text())
    io = np.load(parity_folder / "degradation_io.npz")
    tables = cfg["resolution_tables"]
    cases = [
        ("image", "target_t", tables["fixture"]),
        ("image_256", "target256_N128_t", tables["N128_g8_R256"]),
    ]
    checked = 0
    for image_key, prefix, table in cases:
        image = jnp.asarray(io[image_key].transpose(0, 2, 3, 1))
        for key, size, canvas in _targets(io, prefix, table):
            got = jax.jit(
                lambda x, s=size, c=canvas: bicubic_resize(area_resize(x, (s, s)), (c, c))
            )(image)
            np.testing.assert_allclose(
                np.asarray(got).transpose(0, 3, 1, 2),
                io[key],
                rtol=0,
                atol=1e-5,
                err_msg=f"{parity_folder.name}/{key}",
            )
            checked += 1
    assert checked == sum(1 for k in io.files if k.startswith(("target_t", "target256_")))


def test_area_is_block_mean_and_bicubic_keeps_constants():
    x = jax.random.normal(jax.random.key(0), (2, 12, 8, 3))
    np.testing.assert_allclose(
        area_resize(x, (4, 2)), x.reshape(2, 4, 3, 2, 4, 3).mean(axis=(2, 4)), atol=1e-6
    )
    np.testing.assert_allclose(area_resize(x, (12, 8)), x, atol=0)
    np.testing.assert_allclose(bicubic_resize(x, (12, 8)), x, atol=0)
    const = jnp.full((1, 5, 7, 1), 0.3)
    # rows of the weight matrices sum to 1, also at clamped borders
    for size in [(3, 3), (16, 9), (40, 40)]:
        np.testing.assert_allclose(bicubic_resize(const, size), 0.3, atol=1e-6)
        np.testing.assert_allclose(area_resize(const, size), 0.3, atol=1e-6)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="NHWC"):
        area_resize(jnp.zeros((4, 4, 3)), (2, 2))
    with pytest.raises(ValueError, match="positive"):
        bicubic_resize(jnp.zeros((1, 4, 4, 3)), (0, 2))
