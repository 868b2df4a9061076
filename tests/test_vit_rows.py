"""The ViT blocks compute only the rows that are used (the last block of the tokenizer's encoder and
decoder, the self-correction re-encode) with the same values and gradients as the full
computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax.nn.vit import ViTStack
from detailflow_jax.tokenizer.masks import encoder_mask
from float_tolerance import dot_product_tolerance

WIDTH, HEADS, MLP, DEPTH = 32, 4, 64, 3
PATCHES, LATENTS = 12, 8
LATENT_ROWS = (PATCHES, PATCHES + LATENTS)


def _stack(**kw):
    return ViTStack(depth=DEPTH, width=WIDTH, heads=HEADS, mlp_dim=MLP, **kw)


def _setup():
    x = jax.random.normal(jax.random.key(0), (2, PATCHES + LATENTS, WIDTH))
    mask = jnp.asarray(encoder_mask(PATCHES, LATENTS, group_size=2, causal_num=2))
    params = nn.unbox(_stack().init(jax.random.key(1), x, mask))["params"]
    return x, mask, params


def _assert_close(got, want, scale=None):
    # Row by row the same float32 operations, in another summation order at most: each of the DEPTH
    # blocks adds the rounding of its longest dot product (the MLP's), relative to the largest value
    # (of the whole gradient for gradients: the attention's key bias has an exactly-zero gradient,
    # so its rounding is of the others' size).
    scale = float(np.abs(want).max()) if scale is None else scale
    np.testing.assert_allclose(got, want, rtol=0, atol=DEPTH * dot_product_tolerance(MLP) * scale)


def test_keep_rows_computes_those_rows_of_the_full_stack():
    x, mask, params = _setup()
    full = _stack().apply({"params": params}, x, mask)
    for rows in (LATENT_ROWS, (0, PATCHES)):
        part = _stack(keep_rows=rows).apply({"params": params}, x, mask)
        assert part.shape == (2, rows[1] - rows[0], WIDTH)
        _assert_close(part, full[:, rows[0]:rows[1]])


def test_a_second_pass_over_the_first_pass_patch_states_matches_recomputing_them():
    # The self-correction re-encode: other latent queries over the same patches. Patches never
    # attend to latents, so the first pass's patch states serve the second; values and parameter
    # gradients of both passes together equal those of two full passes.
    x, mask, params = _setup()
    second_queries = jax.random.normal(jax.random.key(2), (2, LATENTS, WIDTH))
    loss = lambda a, b: jnp.sum(jnp.sin(a)) + jnp.sum(jnp.cos(b))

    def reusing(params):
        first, inputs = _stack(keep_rows=LATENT_ROWS).apply(
            {"params": params}, x, mask, return_inputs=True
        )
        second = _stack().apply({"params": params}, second_queries, mask,
                                contexts=[h[:, :PATCHES] for h in inputs])
        return first, second

    def recomputing(params):
        first = _stack().apply({"params": params}, x, mask)[:, PATCHES:]
        again = jnp.concatenate([x[:, :PATCHES], second_queries], axis=1)
        return first, _stack().apply({"params": params}, again, mask)[:, PATCHES:]

    for got, want in zip(reusing(params), recomputing(params)):
        assert got.shape == want.shape == (2, LATENTS, WIDTH)
        _assert_close(got, want)
    g_got = jax.grad(lambda p: loss(*reusing(p)))(params)
    g_want = jax.grad(lambda p: loss(*recomputing(p)))(params)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_want))
    jax.tree.map(lambda a, b: _assert_close(a, b, scale), g_got, g_want)
    # the patch path is trained
    assert float(jnp.abs(g_want["layers_0"]["mlp"]["fc1"]["kernel"]).max()) > 0
