"""Analytic model FLOPs of one train step (the numerator of MFU), whatever the compiler emits.

Transformer convention: a forward pass costs 2 FLOPs per parameter per token plus 4·S·d per layer
per token for attention (QK^T and AV); backward costs twice the forward, so a trained stack costs
3x its forward.
"""

from __future__ import annotations

from detailflow_jax.tokenizer.config import validate
from detailflow_jax.tokenizer.model import count_params


def block_forward(width: int, mlp: int, queries: int, keys: int) -> float:
    """Forward FLOPs per sequence of one ViT block whose ``queries`` rows are updated and whose
    ``keys`` rows give keys and values: q, out and MLP per query row, k and v per key row, then
    attention."""
    return (2 * (2 * width * width + 2 * width * mlp) * queries + 2 * 2 * width * width * keys
            + 4 * queries * keys * width)


def vit_forward(
    width: int, depth: int, mlp: int, seq: int, last_queries: int | None = None
) -> float:
    """Forward FLOPs per sequence of a ViT stack over ``seq`` rows; the last block updates
    ``last_queries`` rows (default all: the rows the output keeps)."""
    last = seq if last_queries is None else last_queries
    return (depth - 1) * block_forward(width, mlp, seq, seq) + block_forward(width, mlp, last, seq)


def gpt_step(model_cfg, params, batch: int) -> float:
    """6 · params · tokens + 12 · layers · S² · d per sample (causal masking not discounted)."""
    seq = model_cfg.num_tokens
    attention = 12 * model_cfg.n_layer * seq * seq * model_cfg.dim
    return batch * (6 * count_params(params) * seq + attention)


# LPIPS runs VGG16 on both images: ~15.5 GMAC (31 GFLOPs) per 224² image, scaled by area.
VGG16_FLOPS_224 = 31e9
# The DINO discriminator backbone is ViT-S/16 at 224² (197 tokens).
DINO_VIT = dict(width=384, depth=12, mlp=1536, seq=197)


def tokenizer_step(config, frozen, canvas: int, batch: int) -> float:
    """Approximate FLOPs of one tokenizer step.

    Generator fwd+bwd (encoder twice on the B images: the clean pass, whose last block updates only
    the latents, and the self-correction re-encode, which updates only the latents over the clean
    pass's patch states, both trained; decoder on the clean + self-corrected 2B, its last block
    updating only the canvas); the frozen nets the generator loss differentiates through (LPIPS,
    DINO: 3x forward on 2B); the discriminator's real/fake (+ consistency) forwards; SigLIP2 forward
    once on B. Left out: patch embedding, VQ, discriminator heads. ``frozen``: the step's FrozenNets
    (the SigLIP2 tower's size)."""
    m, losses = validate(config.model), config.losses
    n, patches, positions = (
        m.num_latent_tokens,
        (m.image_size // m.patch_size) ** 2,
        (canvas // m.patch_size) ** 2,
    )
    e, d = m.encoder, m.decoder
    clean = vit_forward(e.width, e.depth, e.mlp_dim, patches + n, last_queries=n)
    re_encode = e.depth * block_forward(e.width, e.mlp_dim, n, patches + n)
    decode = vit_forward(d.width, d.depth, d.mlp_dim, positions + n, last_queries=positions)
    total = 3 * batch * (clean + re_encode + 2 * decode)
    if losses.lpips_weight > 0:
        total += 3 * 2 * batch * 2 * VGG16_FLOPS_224 * (canvas / 224) ** 2  # x and y through VGG
    if losses.disc_type == "dino":
        dino = vit_forward(**DINO_VIT)
        passes = 2 + (2 if losses.cr_weight > 0 else 0)  # real, fake (+ strong real, strong fake)
        total += 3 * 2 * batch * dino + passes * 2 * batch * dino
    if losses.align_weight > 0:
        s = frozen.siglip
        seq = (m.image_size // s.patch_size) ** 2
        total += batch * vit_forward(s.width, s.depth, s.mlp_dim, seq)
    return float(total)


def gpt_sample(model_cfg, params, batch: int, guidance: bool) -> float:
    """One sampling call: every token (and the class token) through the forward once, with CFG on a
    doubled batch: 2 · params per token, plus 4 · d per visible key per layer (a triangle of N² / 2
    keys)."""
    rows = batch * (2 if guidance else 1)
    seq = model_cfg.num_tokens + 1
    return float(
        rows * (2 * count_params(params) * seq + 2 * model_cfg.n_layer * seq * seq * model_cfg.dim)
    )


def tokenizer_decode(model_cfg, canvas: int, batch: int) -> float:
    """The decoder forward on ``batch`` code sequences at ``canvas``, its last block updating only
    the canvas (patch embedding and quantizer left out)."""
    d = model_cfg.decoder
    positions = (canvas // model_cfg.patch_size) ** 2
    return float(
        batch
        * vit_forward(
            d.width,
            d.depth,
            d.mlp_dim,
            positions + model_cfg.num_latent_tokens,
            last_queries=positions,
        )
    )
