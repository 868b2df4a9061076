"""Parity with the official PyTorch tokenizer for every folder of $DETAILFLOW_PARITY_DIR (sizes from
config.json)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detailflow_jax.convert.state_dict import load_state_dict
from detailflow_jax.convert.tokenizer import convert_tokenizer_state_dict
from detailflow_jax.tokenizer.config import from_fixture_config
from detailflow_jax.tokenizer.model import DetailFlowTokenizer

PIXEL_ATOL = 1e-4


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.parity
def test_tokenizer_matches_official(parity_folder):
    fixture = json.loads((parity_folder / "config.json").read_text())
    cfg = from_fixture_config(fixture)
    imported = convert_tokenizer_state_dict(
        load_state_dict(parity_folder / "tokenizer_state_dict.npz"), cfg
    )
    assert imported.skipped == ["quantize.codebook_used"]
    io = np.load(parity_folder / "tokenizer_io.npz")
    model = DetailFlowTokenizer(cfg)
    variables = {"params": imported.params}
    images = jnp.asarray(io["image"].transpose(0, 2, 3, 1))

    enc = model.apply(variables, images, method=DetailFlowTokenizer.encode)
    np.testing.assert_allclose(enc["pre_quant"], io["pre_quant"], atol=PIXEL_ATOL, rtol=0)
    np.testing.assert_array_equal(enc["indices"], io["indices"])
    np.testing.assert_allclose(enc["quant"], io["quant"], atol=PIXEL_ATOL, rtol=0)

    # One compiled decode per canvas; t is traced (static latent length N, keys >= t masked).
    decode = jax.jit(
        lambda q, t, canvas: model.apply(
            variables, q, t, canvas, method=DetailFlowTokenizer.decode
        ),
        static_argnums=2,
    )
    quant = jnp.asarray(io["quant"])
    for t, canvas in fixture["decode_token_counts"].items():
        got = decode(quant, jnp.int32(int(t)), int(canvas))
        np.testing.assert_allclose(
            nchw(got), io[f"decode_t{t}"], atol=PIXEL_ATOL, rtol=0, err_msg=f"t={t}"
        )

    full = model.apply(
        variables, jnp.asarray(io["indices"]), method=DetailFlowTokenizer.decode_code
    )
    np.testing.assert_allclose(nchw(full), io["decode_code_full"], atol=PIXEL_ATOL, rtol=0)

    # Noise positions traced (one compiled graph for all of them); the forced codes padded to length
    # N.
    self_correct = jax.jit(
        lambda k, end, codes: model.apply(
            variables, images, k, end, noisy_codes=codes, method=DetailFlowTokenizer.self_correct
        )
    )
    for sc in fixture["self_correction"]:
        k, end = sc["noise_idx"], sc["noise_end"]
        codes = np.zeros_like(io["indices"])
        codes[:, k:end] = io[f"sc{k}_noisy_codes"]
        out = self_correct(jnp.int32(k), jnp.int32(end), jnp.asarray(codes))
        np.testing.assert_array_equal(out["clean"], io["indices"])
        np.testing.assert_array_equal(out["input"], io[f"sc{k}_input"], err_msg=f"sc{k}_input")
        np.testing.assert_array_equal(out["label"], io[f"sc{k}_label"], err_msg=f"sc{k}_label")

