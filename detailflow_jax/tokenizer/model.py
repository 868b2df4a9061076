"""DetailFlow 1D tokenizer (official `VQModel`), Flax Linen.

    model = DetailFlowTokenizer(config.model)
    params = init_params(config.model, jax.random.key(0))
    out = model.apply({"params": params}, images, method=DetailFlowTokenizer.encode)
    pixels = model.apply({"params": params}, out["quant"], t, canvas, method=DetailFlowTokenizer.decode)

Images are NHWC in [-1, 1]; decoded pixels are NHWC float32, unclamped. Parameter tree (top level):
``encoder`` (patch_embedding, position_embedding, latent_tokens, refined_tokens, latent_pos_embed,
layers/layers_i, post_layernorm), ``quant_conv``, ``quantizer/codebook``, ``refine_conv``,
``post_quant_conv``, ``decoder`` (mask_token, position_embedding, latent_pos_embed, layers/layers_i,
post_layernorm, to_pixel).

Training forward (``__call__``, docs/model.md#self-correction): clean pass + self-correction
re-encode, both halves decoded as one 2B batch from the first t tokens at ``canvas``. For t = 1 the
official code does no self-correction; here the 2B graph still runs (one compiled graph for every
t): pass ``noise_idx = -1`` and the self-corrected half gets ``recon_weight`` 0 and codebook-loss
weight 0, so the losses equal the official clean-only ones as long as the pixel losses are weighted
per sample with ``recon_weight`` (sum(w·loss) / sum(w)) and the discriminator leaves the zero-weight
half out of its batch (train/tokenizer_step.py masks it).
"""  # noqa: E501

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detailflow_jax.nn.vit import dense, torch_default_inits
from detailflow_jax.sharding import constrain
from detailflow_jax.tokenizer.config import TokenizerConfig, validate
from detailflow_jax.tokenizer.decoder import Decoder
from detailflow_jax.tokenizer.encoder import Encoder
from detailflow_jax.tokenizer.quantizer import (
    Quantized,
    VectorQuantizer,
    batch_usage,
    code_histogram,
    codebook_losses,
    entropy_loss,
    group_cosine_similarity,
    sample_near_codes,
)

# Logical axes of the (B, N, codebook_dim) vectors around the quantizer, pinned batch-sharded
# (`sharding.constrain`).
CODES = ("activation_batch", "activation_length", None)


def _torch_linear(features: int, fan_in: int, names, name: str, dtype, param_dtype) -> nn.Dense:
    kernel_init, bias_init = torch_default_inits(fan_in)
    return dense(
        features, names, name, dtype, param_dtype, kernel_init=kernel_init, bias_init=bias_init
    )


class DetailFlowTokenizer(nn.Module):
    """``config``: the model section of configs/tokenizer.py (ConfigDict / dict) or a
    TokenizerConfig."""

    config: Any

    @property
    def cfg(self) -> TokenizerConfig:
        return validate(self.config)

    def setup(self):
        cfg = self.cfg
        d, enc_w, dec_w = cfg.codebook_dim, cfg.encoder.width, cfg.decoder.width
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # quant_conv runs in float32: its output feeds the argmin.
        self.quant_conv = _torch_linear(d, enc_w, ("embed", "code_dim"), "quant_conv", jnp.float32,
                                        cfg.params_dtype)
        self.refine_conv = _torch_linear(
            enc_w, d, ("code_dim", "embed"), "refine_conv", cfg.compute_dtype, cfg.params_dtype
        )
        self.post_quant_conv = _torch_linear(
            dec_w, d, ("code_dim", "embed"), "post_quant_conv", cfg.compute_dtype, cfg.params_dtype
        )
        self.quantizer = VectorQuantizer(cfg.codebook_size, d, distance_dtype=cfg.distance_dtype)

    # ----------------------------------------------- inference API (official VQModel.encode/decode)

    def encode(self, images: jax.Array) -> dict[str, jax.Array]:
        """images (B, R, R, 3) -> pre_quant (B, N, 8), quant (B, N, 8) straight-through, indices (B,
        N) int32."""
        pre_quant, q = self._quantize(self.encoder(images))
        return dict(pre_quant=pre_quant, quant=q.quant, indices=q.codes, z=q.z)

    def decode(self, quant: jax.Array, t: jax.Array | int, canvas: int) -> jax.Array:
        """quant (B, N, 8) -> pixels (B, canvas, canvas, 3) from the first ``t`` tokens (t may be
        traced)."""
        return self.decoder(self.post_quant_conv(constrain(quant, CODES)), t, canvas)

    def decode_code(
        self, codes: jax.Array, t: jax.Array | int | None = None, canvas: int | None = None
    ) -> jax.Array:
        """codes (B, N) int -> pixels; defaults: all N tokens at image_size."""
        cfg = self.cfg
        t = cfg.num_latent_tokens if t is None else t
        canvas = cfg.image_size if canvas is None else canvas
        return self.decode(self.quantizer.lookup(codes), t, canvas)

    def self_correct(
        self,
        images: jax.Array,
        noise_idx: jax.Array | int,
        noise_end: jax.Array | int,
        noisy_codes: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """The self-correction re-encode (docs/model.md#self-correction steps 1–5; official
        eval-mode `encode_image` with noise_idx).

        Positions [noise_idx, noise_end) get ``noisy_codes`` — (B, N) (only that window is read), or
        (B, noise_end − noise_idx) when both are Python ints — or, when None, codes drawn with
        ``rng`` uniformly from each token's top-k nearest. Returns quant_sc (B, N, 8), the index
        triple clean / input / label (B, N) each, quant_clean, and the token-count weighted codebook
        losses. ``noise_idx < 0`` marks "no perturbation" (weights of the corrected half become 0).
        pre_quant_sc is the re-encoded quant_conv output.
        """
        cfg = self.cfg
        n = cfg.num_latent_tokens
        pos = jnp.arange(n)
        features, patch_states = self.encoder(images, return_patch_states=True)
        pre_quant, qc = self._quantize(features)

        if noisy_codes is None:
            if rng is None:
                raise ValueError(
                    "self_correct needs either noisy_codes or an rng to draw them from the top-k"
                )
            noisy_codes = sample_near_codes(rng, qc.distances, cfg.noise_top_k)
        noisy_codes = self._full_length_codes(noisy_codes, noise_idx, noise_end)

        before = pos < noise_idx
        prefix_end = pos < noise_end
        # Clean prefix ++ noisy window, detached (official `quant_noise`); positions >= noise_end
        # are unused.
        quant_noise = jax.lax.stop_gradient(
            jnp.where(before[None, :, None], qc.hard, self.quantizer.lookup(noisy_codes)))
        prefix = self.refine_conv(quant_noise)
        h2 = self.encoder(images, prefix=prefix, noise_end=noise_end, patch_states=patch_states)
        pre_quant_sc = constrain(self.quant_conv(h2.astype(jnp.float32)), CODES)
        q2 = self.quantizer(pre_quant_sc)
        quant_sc = jnp.where(prefix_end[None, :, None], quant_noise, q2.quant)

        idx_input = jnp.where(
            before[None], qc.codes, jnp.where(prefix_end[None], noisy_codes, q2.codes)
        )
        idx_label = jnp.where(prefix_end[None], qc.codes, q2.codes)

        # Step 7: token-count weights with T = N; the corrected half only counts positions >=
        # noise_end.
        active = jnp.asarray(noise_idx) >= 0
        total = 2 * n - jnp.asarray(noise_end, jnp.float32)
        w_clean = jnp.where(active, n / total, 1.0)
        w_sc = jnp.where(active, (n - jnp.asarray(noise_end, jnp.float32)) / total, 0.0)
        vq_c, commit_c = codebook_losses(
            qc, jnp.ones((n,), bool), cfg.commit_beta, cfg.vq_loss_ratio
        )
        vq_s, commit_s = codebook_losses(q2, ~prefix_end, cfg.commit_beta, cfg.vq_loss_ratio)
        usage = (w_clean * batch_usage(qc.codes, cfg.codebook_size)
                 + w_sc * batch_usage(q2.codes, cfg.codebook_size))
        losses = dict(
            vq_loss=w_clean * vq_c + w_sc * vq_s,
            commit_loss=w_clean * commit_c + w_sc * commit_s,
            codebook_usage=usage,
            code_histogram=code_histogram(qc.codes, cfg.codebook_size),
        )
        if cfg.entropy_loss_ratio > 0:  # a (B, N, K) softmax: skipped at the released weight 0
            # Unlike vq/commit, the official entropy of the corrected pass takes all N positions.
            every = jnp.ones((n,), bool)
            losses["entropy_loss"] = cfg.entropy_loss_ratio * (
                w_clean * entropy_loss(qc.distances, every)
                + w_sc * entropy_loss(q2.distances, every))
        return dict(
            pre_quant=pre_quant,
            pre_quant_sc=pre_quant_sc,
            quant_clean=qc.quant,
            quant_sc=quant_sc,
            clean=qc.codes,
            input=idx_input,
            label=idx_label,
            active=active,
            losses=losses,
        )

    # ---------------------------------------------------------------- training forward

    def __call__(
        self,
        images: jax.Array,
        t: jax.Array | int,
        canvas: int,
        noise_idx: jax.Array | int,
        noise_end: jax.Array | int,
        rng: jax.Array,
        train: bool = True,
    ) -> dict[str, jax.Array]:
        """docs/model.md#self-correction, steps 1–6.

        train=True: recon (2B, canvas, canvas, 3) = decode([clean; self-corrected]) from the first t
        tokens; recon_weight (2B,) = 1 for the clean half, 0/1 for the corrected half (0 when
        noise_idx < 0, i.e. t = 1). train=False: the official eval behaviour, recon (B, …) of the
        self-corrected sequence (clean when noise_idx < 0), recon_weight all ones. Also returns
        vq_loss, commit_loss (weighted as in step 7; entropy_loss too when its ratio is > 0),
        codebook_usage, code_histogram, fea_cosine_sim, quant (the decoded codes) and indices (B, N,
        3) = [clean, input, label].
        """
        sc = self.self_correct(images, noise_idx, noise_end, rng=rng)
        b = images.shape[0]
        if train:
            quant = jnp.concatenate([sc["quant_clean"], sc["quant_sc"]], axis=0)
            recon_weight = jnp.concatenate(
                [jnp.ones((b,)), jnp.broadcast_to(sc["active"].astype(jnp.float32), (b,))]
            )
        else:
            quant = corrected_quant(sc)
            recon_weight = jnp.ones((b,))
        recon = self.decode(quant, t, canvas)
        return dict(
            recon=recon,
            recon_weight=recon_weight,
            quant=quant,
            indices=jnp.stack([sc["clean"], sc["input"], sc["label"]], axis=-1),
            fea_cosine_sim=group_cosine_similarity(quant, self.cfg.group_size),
            **sc["losses"],
        )

    # ---------------------------------------------------------------- helpers

    def _quantize(self, features: jax.Array) -> tuple[jax.Array, Quantized]:
        pre_quant = constrain(self.quant_conv(features.astype(jnp.float32)), CODES)
        return pre_quant, self.quantizer(pre_quant)

    def _full_length_codes(self, codes: jax.Array, noise_idx, noise_end) -> jax.Array:
        n = self.cfg.num_latent_tokens
        codes = jnp.asarray(codes, jnp.int32)
        if codes.shape[1] == n:
            return codes
        if not (isinstance(noise_idx, int) and isinstance(noise_end, int)):
            raise ValueError(
                f"noisy_codes of shape {codes.shape} needs Python-int noise_idx/noise_end; "
                f"with traced positions pass (B, {n}) codes (only [noise_idx, noise_end) is read)"
            )
        if codes.shape[1] != noise_end - noise_idx:
            raise ValueError(f"noisy_codes has {codes.shape[1]} codes per image but the window "
                             f"[{noise_idx}, {noise_end}) holds {noise_end - noise_idx}")
        return jnp.zeros((codes.shape[0], n), jnp.int32).at[:, noise_idx:noise_end].set(codes)


def corrected_quant(sc: dict[str, jax.Array]) -> jax.Array:
    """The codes the official eval-mode forward decodes from a ``self_correct`` result: the
    self-corrected sequence, or the clean one when noise_idx < 0."""
    return jnp.where(sc["active"], sc["quant_sc"], sc["quant_clean"])


# -------------------------------------------------------------------- construction helpers

def _dummy_inputs(cfg: TokenizerConfig):
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return images, cfg.num_latent_tokens, cfg.image_size, 0, 1


def init_variables(model_cfg: Any, rng: jax.Array) -> dict:
    """Boxed variables {'params': …} with logical axis names (for sharding.init_sharded)."""
    cfg = validate(model_cfg)
    model = DetailFlowTokenizer(cfg)
    return model.init(rng, *_dummy_inputs(cfg), rng)


def init_params(model_cfg: Any, rng: jax.Array) -> dict:
    """Plain (unboxed) parameter tree."""
    return nn.unbox(init_variables(model_cfg, rng))["params"]


def abstract_params(model_cfg: Any, boxed: bool = False) -> dict:
    """ShapeDtypeStruct parameter tree via jax.eval_shape (nothing allocated); ``boxed`` keeps the
    logical names."""
    cfg = validate(model_cfg)
    tree = jax.eval_shape(lambda key: init_variables(cfg, key), jax.random.key(0))["params"]
    return tree if boxed else nn.unbox(tree)


def count_params(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.unbox(tree)))
