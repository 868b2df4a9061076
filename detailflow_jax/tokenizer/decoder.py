"""Tokenizer decoder: mask-token canvas + the first t tokens -> pixels (official `SiglipDecoder`;
docs/model.md#decoder)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from detailflow_jax.nn.patches import resized_position_table, unpatchify
from detailflow_jax.nn.vit import ViTStack, dense, layer_norm, torch_default_inits
from detailflow_jax.sharding import STREAM, constrain
from detailflow_jax.tokenizer.config import TokenizerConfig, check_canvas
from detailflow_jax.tokenizer.encoder import token_table
from detailflow_jax.tokenizer.masks import decoder_key_mask


class Decoder(nn.Module):
    """tokens (B, N, width) (post_quant_conv output) -> pixels (B, canvas, canvas, 3) float32,
    unclamped.

    The latent length stays N; latents at index >= ``num_tokens`` are masked out as keys
    (docs/model.md#static-shapes), which is exactly the official "concatenate only the first t"
    because a masked key gets zero attention weight. ``num_tokens`` may be traced; ``canvas`` must
    be a static multiple of the patch size.
    """

    cfg: TokenizerConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, num_tokens: jax.Array | int, canvas: int) -> jax.Array:
        cfg, vit = self.cfg, self.cfg.decoder
        check_canvas(cfg, canvas)
        n, p = cfg.num_latent_tokens, cfg.patch_size
        grid = canvas // p
        b = tokens.shape[0]

        mask_token = self.param(
            "mask_token",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, 1, vit.width),
            cfg.params_dtype,
        )
        table = self.param(
            "position_embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(vit.width**-0.5), ("length", "embed")
            ),
            (cfg.pos_grid**2, vit.width),
            cfg.params_dtype,
        )
        latent_pos_embed = token_table(
            "latent_pos_embed", self, n, vit.width, nn.initializers.truncated_normal(0.02)
        )

        canvas_tokens = mask_token.astype(jnp.float32) + resized_position_table(table, grid)[
            None
        ].astype(jnp.float32)
        canvas_tokens = jnp.broadcast_to(canvas_tokens, (b, grid * grid, vit.width))
        latents = constrain(
            tokens.astype(jnp.float32) + latent_pos_embed.astype(jnp.float32), STREAM
        )
        # The canvas is a broadcast of parameters: pinned, it is built batch-sharded instead of like
        # the weights.
        seq = constrain(
            jnp.concatenate([constrain(canvas_tokens, STREAM), latents], axis=1), STREAM
        )

        # Only the canvas rows of the last block are used.
        stack = ViTStack(depth=vit.depth, width=vit.width, heads=vit.heads, mlp_dim=vit.mlp_dim,
                         ln_eps=cfg.ln_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                         remat=cfg.remat, keep_rows=(0, grid * grid), name="layers")
        seq = stack(seq, decoder_key_mask(grid * grid, n, num_tokens))
        seq = layer_norm("post_layernorm", cfg.ln_eps, cfg.params_dtype)(seq)
        kernel_init, bias_init = torch_default_inits(vit.width)
        pixels = dense(
            p * p * 3,
            ("embed", "pixels"),
            "to_pixel",
            cfg.compute_dtype,
            cfg.params_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
        )(seq)
        pixels = constrain(pixels, ("activation_batch", "activation_length", None))
        return unpatchify(pixels.astype(jnp.float32), p)
