"""Attention masks of the tokenizer ViTs (True = may attend), as in the official
`create_attn_mask_for_x_z`.

Encoder sequence = [P patches | N latent queries] (docs/model.md#attention-masks):
  * patch -> patch: always; patch -> latent: never (patch features do not depend on the latents);
  * latent -> patch: always;
  * latent i -> latent j: inside the token-causal prefix (i < C) iff j <= i; after it iff floor(j/g)
    <= floor(i/g) (bidirectional inside a group, causal across groups).
Decoder sequence = [canvas positions | N latents]: fully bidirectional, except that latents at index
>= t (the tokens the decoder is not given) are masked out as keys, so t can be a traced value with a
static length N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def latent_mask(num_latents: int, group_size: int, causal_num: int) -> np.ndarray:
    """(N, N) bool: may latent i attend to latent j."""
    if num_latents % group_size or causal_num % group_size or causal_num > num_latents:
        raise ValueError(
            f"latent mask needs N % g == 0, C % g == 0 and C <= N; got N={num_latents}, "
            f"g={group_size}, C={causal_num}"
        )
    i = np.arange(num_latents)[:, None]
    j = np.arange(num_latents)[None, :]
    token_causal = j <= i
    group_causal = (j // group_size) <= (i // group_size)
    return np.where(i < causal_num, token_causal, group_causal)


def encoder_mask(
    num_patches: int, num_latents: int, group_size: int, causal_num: int
) -> np.ndarray:
    """(P + N, P + N) bool mask of the tokenizer encoder."""
    p, n = num_patches, num_latents
    mask = np.zeros((p + n, p + n), dtype=bool)
    mask[:p, :p] = True
    mask[p:, :p] = True
    mask[p:, p:] = latent_mask(n, group_size, causal_num)
    return mask


def decoder_key_mask(
    num_positions: int, num_latents: int, num_tokens: jax.Array | int
) -> jax.Array:
    """(1, 1, 1, P + N) bool: canvas positions and the first ``num_tokens`` latents are visible
    keys."""
    idx = jnp.arange(num_positions + num_latents)
    return (idx < num_positions + num_tokens)[None, None, None, :]
