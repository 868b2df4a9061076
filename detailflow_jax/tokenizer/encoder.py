"""Tokenizer encoder: SigLIP2 ViT over [image patches | N latent queries] (official `SiglipEncoder`;
docs/model.md#encoder)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from detailflow_jax.nn.patches import patchify, resized_position_table
from detailflow_jax.nn.vit import ViTStack, dense, layer_norm
from detailflow_jax.sharding import STREAM, constrain
from detailflow_jax.tokenizer.config import TokenizerConfig
from detailflow_jax.tokenizer.masks import encoder_mask


def token_table(name: str, module: nn.Module, length: int, width: int, init) -> jax.Array:
    """A learned (1, length, width) token table (queries, position embeddings, mask token)."""
    return module.param(
        name,
        nn.with_logical_partitioning(init, (None, "length", "embed")),
        (1, length, width),
        module.cfg.params_dtype,
    )


class Encoder(nn.Module):
    """images (B, H, W, 3) in [-1, 1] -> latent features (B, N, width) after post_layernorm.

    Queries: ``latent_tokens`` for the normal pass. For the self-correction re-encode
    (docs/model.md#self-correction, step 4) pass ``prefix`` (B, N, width), used at positions <
    ``noise_end`` (refine_conv of the clean+noisy codes), with ``refined_tokens`` after it;
    ``noise_end`` may be traced.

    Patch rows never attend to the latents, so their states are the same in both passes:
    ``return_patch_states`` returns them (one (B, P, width) array per block) with the latents, and a
    pass given ``patch_states`` computes only the latent rows against them (the re-encode then costs
    the N latent rows instead of P + N).
    """

    cfg: TokenizerConfig

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        prefix: jax.Array | None = None,
        noise_end: jax.Array | int | None = None,
        patch_states: list[jax.Array] | None = None,
        return_patch_states: bool = False,
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        cfg, vit = self.cfg, self.cfg.encoder
        n, p = cfg.num_latent_tokens, cfg.patch_size
        if images.shape[1] != images.shape[2]:
            raise ValueError(f"images must be square (B, R, R, 3), got {images.shape}")
        grid = images.shape[1] // p
        num_patches = grid * grid

        std = nn.initializers.normal(0.02)
        latent_tokens = token_table("latent_tokens", self, n, vit.width, std)
        refined_tokens = token_table("refined_tokens", self, n, vit.width, std)
        latent_pos_embed = token_table(
            "latent_pos_embed", self, n, vit.width, nn.initializers.truncated_normal(0.02)
        )
        if prefix is None:
            queries = jnp.broadcast_to(latent_tokens, (images.shape[0], n, vit.width)).astype(
                jnp.float32
            )
        else:
            before = (jnp.arange(n) < noise_end)[None, :, None]
            queries = jnp.where(
                before, prefix.astype(jnp.float32), refined_tokens.astype(jnp.float32)
            )
        z = constrain(queries + latent_pos_embed.astype(jnp.float32), STREAM)

        mask = jnp.asarray(encoder_mask(num_patches, n, cfg.group_size, cfg.causal_num))
        stack = lambda keep: ViTStack(  # noqa: E731
            depth=vit.depth, width=vit.width, heads=vit.heads, mlp_dim=vit.mlp_dim,
            ln_eps=cfg.ln_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
            remat=cfg.remat, keep_rows=keep, name="layers")
        if patch_states is not None:
            z = stack(None)(z, mask, contexts=patch_states)
        else:
            # Pinned batch-sharded: left free, the partitioner may shard them over embed like the
            # weights beside them.
            patches = constrain(patchify(images.astype(cfg.compute_dtype), p), STREAM)
            x = dense(
                vit.width,
                ("patch", "embed"),
                "patch_embedding",
                cfg.compute_dtype,
                cfg.params_dtype,
                kernel_init=nn.initializers.lecun_normal(),
            )(patches)
            table = self.param(
                "position_embedding",
                nn.with_logical_partitioning(
                    nn.initializers.normal(vit.width**-0.5), ("length", "embed")
                ),
                (cfg.pos_grid**2, vit.width),
                cfg.params_dtype,
            )
            x = constrain(
                x.astype(jnp.float32) + resized_position_table(table, grid).astype(jnp.float32),
                STREAM,
            )
            # Only the latent rows of the last block are used.
            z, inputs = stack((num_patches, num_patches + n))(jnp.concatenate([x, z], axis=1), mask,
                                                               return_inputs=True)
            patch_states = [h[:, :num_patches] for h in inputs]
        z = constrain(layer_norm("post_layernorm", cfg.ln_eps, cfg.params_dtype)(z), STREAM)
        return (z, patch_states) if return_patch_states else z
