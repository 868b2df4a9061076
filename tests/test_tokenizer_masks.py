"""Attention masks (docs/model.md#attention-masks) and the patch orders (docs/model.md#encoder,
#decoder)."""

import jax.numpy as jnp
import numpy as np

from detailflow_jax.nn.patches import patchify, resized_position_table, unpatchify
from detailflow_jax.tokenizer.masks import decoder_key_mask, encoder_mask, latent_mask


def _rows(text):
    return np.array([[c == "1" for c in row] for row in text.split()])


def test_latent_mask_first_group_token_causal_then_group_causal():
    # N = 8, g = 2, C = 2: token-causal over the first group, then bidirectional inside groups of 2.
    expected = _rows("""
        10000000
        11000000
        11110000
        11110000
        11111100
        11111100
        11111111
        11111111""")
    np.testing.assert_array_equal(latent_mask(8, 2, 2), expected)


def test_latent_mask_causal_prefix_longer_than_a_group():
    # N = 8, g = 2, C = 4: the first two groups are token-causal.
    expected = _rows("""
        10000000
        11000000
        11100000
        11110000
        11111100
        11111100
        11111111
        11111111""")
    np.testing.assert_array_equal(latent_mask(8, 2, 4), expected)


def test_latent_mask_matches_rule_for_released_setting():
    n, g, c = 128, 8, 8
    mask = latent_mask(n, g, c)
    for i in range(n):
        for j in range(n):
            allowed = j <= i if i < c else j // g <= i // g
            assert mask[i, j] == allowed, (i, j)


def test_encoder_mask_blocks():
    p, n = 4, 8
    mask = encoder_mask(p, n, 4, 4)
    assert mask[:p, :p].all()          # patches see patches
    assert not mask[:p, p:].any()      # patches never see latents
    assert mask[p:, :p].all()          # latents see every patch
    np.testing.assert_array_equal(mask[p:, p:], latent_mask(n, 4, 4))


def test_decoder_key_mask_hides_latents_from_t():
    mask = np.asarray(decoder_key_mask(4, 6, jnp.int32(2)))[0, 0, 0]
    np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 1, 0, 0, 0, 0])


def test_patchify_order_row_col_channel():
    images = np.arange(2 * 32 * 48 * 3, dtype=np.float32).reshape(2, 32, 48, 3)
    patches = np.asarray(patchify(jnp.asarray(images), 16))
    assert patches.shape == (2, 6, 768)
    # Patch 4 = grid row 1, column 1; its element (row 2, col 5, channel 1) sits at (2*16 + 5)*3 +
    # 1.
    assert patches[1, 4, (2 * 16 + 5) * 3 + 1] == images[1, 16 + 2, 16 + 5, 1]
    square = images[:, :, :32]
    np.testing.assert_array_equal(unpatchify(patchify(jnp.asarray(square), 16), 16), square)


def test_position_table_resize_identity_and_constant():
    table = jnp.asarray(np.random.default_rng(0).normal(size=(256, 5)), jnp.float32)
    np.testing.assert_array_equal(resized_position_table(table, 16), table)
    const = jnp.ones((256, 3))
    np.testing.assert_allclose(resized_position_table(const, 5), np.ones((25, 3)), atol=1e-6)
