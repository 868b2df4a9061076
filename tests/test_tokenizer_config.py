"""Tokenizer configs: released sizes, argument overrides, validation errors that name the key."""

import json

import pytest

from configs.tokenizer import get_config
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.tokenizer.config import from_fixture_config, validate


@pytest.mark.parametrize("variant,n", [("DF-16", 128), ("DF-32", 256), ("DF-64", 512)])
def test_released_variants(variant, n):
    cfg = validate(get_config(variant).model)
    assert (
        cfg.image_size,
        cfg.patch_size,
        cfg.num_latent_tokens,
        cfg.group_size,
        cfg.causal_num,
    ) == (256, 16, n, 8, 8)
    assert (cfg.codebook_size, cfg.codebook_dim, cfg.noise_top_k) == (8192, 8, 50)
    assert (cfg.encoder.width, cfg.encoder.depth, cfg.encoder.heads, cfg.encoder.mlp_dim) == (
        1152,
        12,
        16,
        4304,
    )
    assert (cfg.decoder.width, cfg.decoder.depth, cfg.decoder.heads, cfg.decoder.mlp_dim) == (
        768,
        12,
        12,
        3072,
    )


def test_argument_overrides():
    cfg = get_config("DF-16,N=64,g=4,C=8,K=1024,dec_depth=6,enc_heads=8,dtype=bfloat16,remat").model
    assert (cfg.num_latent_tokens, cfg.group_size, cfg.causal_num, cfg.codebook_size) == (
        64,
        4,
        8,
        1024,
    )
    assert (cfg.decoder.depth, cfg.encoder.heads, cfg.dtype, cfg.remat) == (6, 8, "bfloat16", True)
    assert cfg.encoder.width == 1152  # untouched
    validate(cfg)
    for variant in ("tiny", "small"):
        validate(get_config(variant).model)


@pytest.mark.parametrize("arg,key", [
    ("tiny,N=30", "num_latent_tokens"),       # N % g
    ("tiny,C=6", "causal_num"),               # C % g
    ("tiny,C=64", "causal_num"),              # C <= N
    ("tiny,image=72", "image_size"),          # image % patch
    ("tiny,enc_heads=5", "encoder.heads"),    # heads | width
    ("tiny,dec_heads=7", "decoder.heads"),
    ("tiny,dtype=float16", "dtype"),
    ("tiny,K=32", "noise_top_k"),             # top-50 needs >= 50 codes
])
def test_validation_names_the_key(arg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "="):
        validate(get_config(arg).model)


def test_unknown_variant_and_argument():
    with pytest.raises(ConfigError, match="variant"):
        get_config("DF-128")
    with pytest.raises(ConfigError, match="bogus"):
        get_config("DF-16,bogus=3")


def test_from_fixture_config(repo_fixtures):
    folder = repo_fixtures / "official_parity" / "tiny_a"
    fixture = json.loads((folder / "config.json").read_text())
    cfg = validate(from_fixture_config(fixture))
    assert cfg.num_latent_tokens == fixture["num_latent_tokens"]
    assert cfg.causal_num == fixture["causal_num"]
    assert cfg.encoder.mlp_dim == 4 * fixture["encoder"]["width"]
    assert cfg.decoder.depth == fixture["decoder"]["layers"]
