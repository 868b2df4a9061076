"""l2-normalised vector quantizer (official `VectorQuantizer` with codebook_l2_norm=True;
docs/model.md#quantizer).

Everything here runs in float32, except, with ``distance_dtype="bfloat16"``, the code-distance
einsum, which is then rounded as the official one is under bf16 autocast (its inputs and its output
to bfloat16). The codebook is learned by gradient through ``vq_loss`` (no EMA, no restarts). The
official entropy loss (`entropy_loss`) has weight 0 in every released config; it is computed only
when a config gives it a weight.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from detailflow_jax.pixels import round_to_bfloat16


def _codebook_init(key, shape, dtype=jnp.float32):
    """uniform(-1/K, 1/K) then l2-normalised rows, as the official init."""
    k = shape[0]
    table = jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)
    return l2_normalize(table)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch `F.normalize(p=2)`: x / max(||x||, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Quantized(NamedTuple):
    z: jax.Array          # (B, N, d) normalised encoder output
    codes: jax.Array      # (B, N) nearest-code indices (int32)
    hard: jax.Array       # (B, N, d) codebook vectors of ``codes`` (no gradient path to z)
    quant: jax.Array      # (B, N, d) straight-through: z + sg(hard - z)
    distances: jax.Array  # (B, N, K) squared distances on the sphere


class VectorQuantizer(nn.Module):
    """Holds the (K, d) codebook; call to quantize (B, N, d) vectors."""

    codebook_size: int
    codebook_dim: int
    distance_dtype: str = "float32"

    def setup(self):
        self.codebook = self.param(
            "codebook", nn.with_logical_partitioning(_codebook_init, ("codebook", "code_dim")),
            (self.codebook_size, self.codebook_dim), jnp.float32)

    def normalized_codebook(self) -> jax.Array:
        return l2_normalize(self.codebook.astype(jnp.float32))

    def _similarities(self, z: jax.Array, book: jax.Array) -> jax.Array:
        """(B, N, K) dot products of tokens and codes. In bf16 autocast torch rounds the einsum's
        inputs to bf16, accumulates in float32 and rounds the output to bf16; the products of bf16
        values are exact in float32, so HIGHEST precision plus explicit roundings reproduce it on
        every backend."""
        if self.distance_dtype == "float32":
            return jnp.einsum("bnd,kd->bnk", z, book)
        dots = jnp.einsum("bnd,kd->bnk", round_to_bfloat16(z), round_to_bfloat16(book),
                          precision=jax.lax.Precision.HIGHEST)
        return round_to_bfloat16(dots)

    def lookup(self, codes: jax.Array) -> jax.Array:
        """(…) int codes -> (…, d) normalised codebook vectors (official `get_codebook_entry`)."""
        return jnp.take(self.normalized_codebook(), codes, axis=0)

    def __call__(self, z: jax.Array) -> Quantized:
        z = l2_normalize(z.astype(jnp.float32))
        book = self.normalized_codebook()
        # Same formula as the official code, so argmin ties resolve identically.
        distances = (jnp.sum(z ** 2, axis=-1, keepdims=True) + jnp.sum(book ** 2, axis=-1)
                     - 2.0 * self._similarities(z, book))
        codes = jnp.argmin(distances, axis=-1).astype(jnp.int32)
        hard = jnp.take(book, codes, axis=0)
        return Quantized(z, codes, hard, z + jax.lax.stop_gradient(hard - z), distances)


def sample_near_codes(rng: jax.Array, distances: jax.Array, top_k: int) -> jax.Array:
    """For every token, a code drawn uniformly from its ``top_k`` nearest (the nearest included):
    (B, N) int32."""
    _, nearest = jax.lax.top_k(-distances, top_k)
    pick = jax.random.randint(rng, distances.shape[:-1] + (1,), 0, top_k)
    return jnp.take_along_axis(nearest, pick, axis=-1)[..., 0].astype(jnp.int32)


def codebook_losses(
    q: Quantized, valid: jax.Array, beta: float, vq_ratio: float
) -> tuple[jax.Array, jax.Array]:
    """(vq_loss, commit_loss) averaged over the token positions where ``valid`` (N,) is True.

    vq = ratio·mean((hard − sg(z))²) trains the codebook, commit = β·mean((sg(hard) − z)²) trains
    the encoder (official: taken over positions [noise_end:]).
    """
    weight = valid.astype(jnp.float32)[None, :, None]
    count = jnp.maximum(jnp.sum(weight) * q.z.shape[0] * q.z.shape[-1], 1.0)
    vq = jnp.sum(weight * (q.hard - jax.lax.stop_gradient(q.z)) ** 2) / count
    commit = jnp.sum(weight * (jax.lax.stop_gradient(q.hard) - q.z) ** 2) / count
    return vq * vq_ratio, commit * beta


def entropy_loss(distances: jax.Array, valid: jax.Array, temperature: float = 0.01) -> jax.Array:
    """Official `compute_entropy_loss(-d)` (LlamaGen), over the token positions where ``valid`` (N,)
    is True.

    With p = softmax(-d / temperature) per token: mean per-token entropy of p minus the entropy of
    the mean p. It is lowest (−log K) when every token is sure of its code and the codes are used
    evenly, and 0 when all tokens are sure of the same code.
    """
    logits = -distances.astype(jnp.float32) / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    weight = valid.astype(jnp.float32)[None, :, None]
    count = jnp.maximum(jnp.sum(weight) * distances.shape[0], 1.0)
    sample_entropy = -jnp.sum(weight * probs * jax.nn.log_softmax(logits, axis=-1)) / count
    mean_probs = jnp.sum(weight * probs, axis=(0, 1)) / count
    mean_entropy = -jnp.sum(mean_probs * jnp.log(mean_probs + 1e-5))
    return sample_entropy - mean_entropy


def code_histogram(codes: jax.Array, codebook_size: int) -> jax.Array:
    """(K,) int32 count of each code in ``codes`` (for usage statistics across steps)."""
    return jnp.zeros((codebook_size,), jnp.int32).at[codes.reshape(-1)].add(1)


def batch_usage(codes: jax.Array, codebook_size: int) -> jax.Array:
    """Fraction of the codebook used by ``codes``.

    The official logs the unique codes among the last 65,536 assigned; a trainer can reproduce that
    by summing `code_histogram` over recent steps.
    """
    return jnp.mean((code_histogram(codes, codebook_size) > 0).astype(jnp.float32))


def group_cosine_similarity(quant: jax.Array, group_size: int) -> jax.Array:
    """Mean pairwise cosine between distinct tokens of each group (official `fea_cosine_sim`,
    monitoring only)."""
    b, n, d = quant.shape
    x = l2_normalize(jax.lax.stop_gradient(quant).reshape(b * n // group_size, group_size, d))
    sims = jnp.einsum("gid,gjd->gij", x, x)
    off_diagonal = jnp.sum(sims, axis=(1, 2)) - jnp.trace(sims, axis1=1, axis2=2)
    return (
        jnp.mean(off_diagonal / (group_size * (group_size - 1)))
        if group_size > 1
        else jnp.float32(-100.0)
    )
