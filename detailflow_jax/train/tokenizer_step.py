"""The tokenizer train step: generator update, then discriminator update, one jit per canvas
(docs/model.md#degradation, docs/fidelity.md#losses).

State (a plain pytree, checkpointed as is):
  step        int32, number of updates done
  rng         PRNG key; per-step keys are ``fold_in(rng, step)``
  params      tokenizer parameters (float32)
  align_proj  ``global_token_proj`` parameters of the alignment loss (only when losses.align_weight > 0)
  opt         Adam state of the tokenizer: of ``params``, or of {"tokenizer": params, "align_proj": align_proj}
              when the alignment loss is on (one optimiser and one gradient clip over both, as the official
              VQModel, which owns global_token_proj)
  disc        {"params", "batch_stats"} of the discriminator ({} when the GAN loss is off)
  disc_opt    Adam state of the discriminator
  lecam       LeCAM EMAs of the discriminator logits

Frozen networks (LPIPS-VGG, the DINO backbone, the SigLIP2 tower of the alignment loss) are arguments, not state:
they are converted from user files and never trained. The decoder canvas is a static shape, so
``TokenizerStep.compiled(canvas)`` compiles one step per canvas and reuses it; t, the degradation matrix and the
noise span are traced inputs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from detailflow_jax import optim, sharding
from detailflow_jax.losses import diffaug, gan
from detailflow_jax.losses.alignment import (SiglipVisionTower, alignment_loss, init_projection, load_siglip_tower,
                                             siglip_target)
from detailflow_jax.losses.discriminator import DinoDiscriminator, load_dino_params
from detailflow_jax.losses.lpips import LPIPS, load_lpips_params
from detailflow_jax.losses.patchgan import PatchGANDiscriminator
from detailflow_jax.nn.resample import bicubic_resize
from detailflow_jax.tokenizer.config import validate
from detailflow_jax.tokenizer.degradation import degrade
from detailflow_jax.tokenizer.model import DetailFlowTokenizer, init_variables
from detailflow_jax.train.encoder_init import encoder_weights, with_pretrained_encoder

DISC_TYPES = ("none", "patchgan", "dino")


def _is_decoder_param(path: tuple) -> bool:
    """Whether a leaf of ``_trainable`` trains under finetune_decoder_only (official: names containing
    'decoder.' or 'post_quant_conv'); the alignment projection stays frozen."""
    keys = [getattr(k, "key", None) for k in path]
    keys = keys[1:] if keys[0] == "tokenizer" else keys
    return keys[0] in ("decoder", "post_quant_conv")


@dataclasses.dataclass
class TokenizerStep:
    """Builds the state, its shardings and the per-canvas compiled steps from a training config."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    # The run's learning rates and step counts (optim.resolve_tokenizer_schedule); None: resolved from the config's
    # explicit step counts alone (no dataset size).
    lr_schedule: optim.ResolvedSchedule | None = None

    def __post_init__(self):
        cfg = self.config
        if self.lr_schedule is None:
            self.lr_schedule = optim.resolve_tokenizer_schedule(cfg, dataset_size=None)
        self.model_cfg = validate(cfg.model)
        self.model = DetailFlowTokenizer(self.model_cfg)
        self.rules = sharding.rules_from_config(cfg)
        losses = cfg.losses
        if losses.disc_type not in DISC_TYPES:
            raise ValueError(f"losses.disc_type={losses.disc_type!r}: must be one of {DISC_TYPES}")
        self.schedule = gan.GANSchedule(
            disc_start=losses.disc_start, disc_weight=losses.disc_weight, perceptual_weight=losses.lpips_weight,
            perceptual_warmup=losses.lpips_warmup, lecam_weight=losses.lecam_weight, cr_weight=losses.cr_weight)
        lr = optim.tokenizer_schedule(self.lr_schedule)
        self.lr = lr
        self.tx = optim.adam(lr, cfg.optim.b1, cfg.optim.b2, cfg.optim.clip_norm)
        if cfg.get("finetune_decoder_only", False):
            self.tx = optim.train_only(self.tx, _is_decoder_param)
        self.disc_tx = optim.adam(lr, cfg.optim.b1, cfg.optim.b2, cfg.optim.clip_norm)
        self.disc = {"none": None, "patchgan": PatchGANDiscriminator(losses.patchgan_width, losses.patchgan_layers),
                     "dino": DinoDiscriminator()}[losses.disc_type]
        # Dropout in the LPIPS heads while training, as in the official loss module (train mode).
        self.lpips = LPIPS(dropout_rate=losses.lpips_dropout) if losses.lpips_weight > 0 else None
        self.align = losses.align_weight > 0
        self.siglip = None  # the frozen SigLIP2 tower module, sized by its weights in load_frozen()
        self._compiled: dict[int, Any] = {}

    # ------------------------------------------------------------------ frozen networks

    def load_frozen(self) -> dict:
        """The user-supplied frozen weights the enabled losses need (a clear error names any that are missing)."""
        encoder_weights(self.config)  # the encoder's SigLIP2 start is checked here, loaded by init()
        frozen = {}
        if self.lpips is not None:
            frozen["lpips"] = load_lpips_params(self.config.losses.lpips_weights)
        if self.config.losses.disc_type == "dino":
            frozen["dino"], heads = load_dino_params(self.config.losses.dino_weights)
            frozen["dino_heads"] = heads
        if self.align:
            self.siglip, frozen["siglip"] = load_siglip_tower(self.config.losses.siglip_weights,
                                                              self.model_cfg.compute_dtype)
            if self.model_cfg.image_size % self.siglip.patch_size:
                raise ValueError(f"model.image_size={self.model_cfg.image_size} is not a multiple of the SigLIP2 "
                                 f"patch size {self.siglip.patch_size} (alignment loss); set losses.align_weight=0")
        return frozen

    def abstract_frozen(self) -> dict:
        """``load_frozen()``'s tree as ShapeDtypeStructs of the real networks' shapes (DINO ViT-S/16, LPIPS-VGG16,
        SigLIP2-so400m), with no weight file read and nothing allocated: what ahead-of-time compiles take."""
        key = jax.random.key(0)
        size = self.model_cfg.image_size
        image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        frozen = {}
        if self.lpips is not None:
            frozen["lpips"] = jax.eval_shape(self.lpips.init, key, image, image)
        if self.config.losses.disc_type == "dino":
            dino_image = jax.ShapeDtypeStruct((1, self.disc.img_size, self.disc.img_size, 3), jnp.float32)
            frozen["dino"] = jax.eval_shape(self.disc.backbone().init, key, dino_image)["params"]
        if self.align:
            self.siglip = SiglipVisionTower(dtype=self.model_cfg.compute_dtype)
            frozen["siglip"] = jax.eval_shape(self.siglip.init, key, image)["params"]
        return nn.unbox(frozen)

    def _siglip(self):
        if self.siglip is None:
            raise RuntimeError("losses.align_weight > 0: call load_frozen() first (it loads the SigLIP2 tower)")
        return self.siglip

    def _trainable(self, state: dict) -> Any:
        """What the tokenizer's Adam optimises: the tokenizer, plus global_token_proj with the alignment loss."""
        if self.align:
            return {"tokenizer": state["params"], "align_proj": state["align_proj"]}
        return state["params"]

    def _with_trainable(self, state: dict, trainable: Any) -> dict:
        if self.align:
            return dict(state, params=trainable["tokenizer"], align_proj=trainable["align_proj"])
        return dict(state, params=trainable)

    # ------------------------------------------------------------------ state

    def _init_state(self, rng: jax.Array, dino_backbone=None) -> dict:
        k_model, k_disc, k_state = jax.random.split(rng, 3)
        params = init_variables(self.model_cfg, k_model)["params"]
        state = dict(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(k_state), params=params,
                     disc={}, disc_opt=optax.EmptyState(), lecam=gan.lecam_init())
        if self.align:  # its own key, so the tokenizer's initialisation does not depend on the loss
            state["align_proj"] = init_projection(jax.random.fold_in(rng, 1), self.model_cfg.codebook_dim,
                                                  self._siglip().width)
        state["opt"] = self.tx.init(self._trainable(state))
        if self.disc is not None:
            size = self.model_cfg.image_size
            dummy = jnp.zeros((1, size, size, 3), jnp.float32)
            args = (dummy, dino_backbone, False) if dino_backbone is not None else (dummy, False)
            disc = dict(self.disc.init(k_disc, *args))
            state["disc"] = disc
            state["disc_opt"] = self.disc_tx.init(disc["params"])
        return state

    def init(self, seed: int, frozen: dict) -> tuple[dict, Any]:
        """The initial state, born sharded on the mesh, and its shardings (the encoder from SigLIP2 when
        ``encoder_pretrained``; a resumed run restores its checkpoint instead and never calls this)."""
        backbone = frozen.get("dino")
        state, shardings = sharding.init_sharded(lambda r: self._init_state(r, backbone), self.mesh,
                                                 jax.random.key(seed), rules=self.rules)
        if path := encoder_weights(self.config):  # Adam's moments start at zero whatever the values
            state["params"] = with_pretrained_encoder(state["params"], shardings["params"], path, self.model_cfg)
        if frozen.get("dino_heads") is not None:  # official heads given: start from them
            state["disc"] = jax.device_put(frozen["dino_heads"], shardings["disc"])
        return state, shardings

    def abstract_state(self, seed: int, frozen: dict) -> Any:
        """ShapeDtypeStructs with the state's shardings (restore target), nothing allocated."""
        # The backbone is an argument (not a closure) so abstract frozen weights work too.
        return sharding.abstract_sharded(self._init_state, self.mesh, jax.random.key(seed), frozen.get("dino"),
                                         rules=self.rules)

    # ------------------------------------------------------------------ the step

    def _disc_logits(self, variables: dict, images: jax.Array, frozen: dict, key: jax.Array,
                     weight: jax.Array):
        """Discriminator logits in train mode and the updated batch_stats.

        Only samples of nonzero weight enter the batch statistics: at t = 1 the official
        discriminator sees the B clean images alone.
        """
        mask = weight > 0
        if self.config.losses.disc_type == "dino":
            return self.disc.apply(variables, images, frozen["dino"], True, key, mask,
                                   mutable=["batch_stats"])
        size = self.model_cfg.image_size
        if images.shape[1] != size:  # PatchGAN sees every canvas at full size, as DINO sees 224.
            images = bicubic_resize(images, (size, size))
        return self.disc.apply(variables, images, True, mask, mutable=["batch_stats"])

    def image_losses(self, disc: dict, frozen: dict, recon: jax.Array, target: jax.Array, weight: jax.Array,
                     step1: jax.Array, keys: tuple) -> tuple[jax.Array, dict, dict]:
        """The generator's losses on the decoded images (official ``VQLoss.forward``, optimizer_idx 0): MSE,
        LPIPS and the adversarial term, weighted for the 1-based ``step1``. ``keys`` = (DiffAugment, DINO crop,
        LPIPS dropout). Returns (weighted sum, metrics, the discriminator's batch_stats after its call)."""
        losses = self.config.losses
        k_aug, k_disc, k_lpips = keys
        mse = gan.sample_mean(jnp.mean((recon - target) ** 2, axis=(1, 2, 3)), weight)
        loss = losses.mse_weight * mse
        metrics, disc_stats = dict(mse=mse), {}
        if self.lpips is not None:
            lp = gan.sample_mean(self.lpips.apply(frozen["lpips"], target, recon, True, rngs={"dropout": k_lpips}),
                                 weight)
            loss = loss + self.schedule.perceptual(step1) * lp
            metrics["lpips"] = lp
        if self.disc is not None:
            fake = diffaug.diff_augment(k_aug, recon, losses.diffaug_policy, losses.diffaug_prob)
            logits, disc_stats = self._disc_logits(disc, fake, frozen, k_disc, weight)
            g_adv = gan.hinge_g_loss(logits, weight)
            loss = loss + self.schedule.adversarial(step1) * g_adv
            metrics["g_adv"] = g_adv
        return loss, metrics, disc_stats

    def disc_loss(self, disc_params: Any, disc: dict, frozen: dict, fake: jax.Array, target: jax.Array,
                  weight: jax.Array, step1: jax.Array, lecam: gan.LeCAMState, keys: tuple):
        """The discriminator's loss (official ``VQLoss.forward``, optimizer_idx 1) from the variables ``disc``
        left by the generator's call. ``keys`` = (DiffAugment real, fake, strong; DINO crops). Returns
        (loss, (new LeCAM state, variables after the calls, metrics))."""
        losses = self.config.losses
        k_real, k_fake, k_strong, k_d = keys
        # DINO draws a crop at every call (official FrozenDINOSmallNoDrop.forward).
        k_d_real, k_d_fake, k_d_strong_real, k_d_strong_fake = jax.random.split(k_d, 4)
        # Every train-mode call runs a power iteration and a BatchNorm update; the official module keeps them
        # all: generator's call, real, fake, strong real, strong fake.
        variables = dict(disc, params=disc_params)

        def logits(images, crop_key):
            nonlocal variables
            out, mut = self._disc_logits(variables, images, frozen, crop_key, weight)
            variables = dict(variables, **mut)
            return out

        aug = lambda k, x: diffaug.diff_augment(k, x, losses.diffaug_policy, losses.diffaug_prob)
        real_logits = logits(aug(k_real, target), k_d_real)
        fake_logits = logits(aug(k_fake, fake), k_d_fake)
        strong = {}
        if losses.cr_weight > 0:
            k_sr, k_sf = jax.random.split(k_strong)
            strong_aug = lambda k, x: diffaug.diff_augment(k, x, losses.cr_policy, 1.0)
            strong["strong_real"] = logits(strong_aug(k_sr, target), k_d_strong_real)
            strong["strong_fake"] = logits(strong_aug(k_sf, fake), k_d_strong_fake)
        loss, lecam, m = gan.discriminator_loss(self.schedule, step1, lecam, real_logits, fake_logits, **strong,
                                                weight=weight)
        return loss, (lecam, variables, m)

    def step(self, state: dict, frozen: dict, images: jax.Array, t: jax.Array, matrix: jax.Array,
             noise_idx: jax.Array, noise_end: jax.Array, *, canvas: int) -> tuple[dict, dict]:
        # The rules in context while tracing turn the models' activation constraints on (`sharding.constrain`).
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), nn.logical_axis_rules(self.rules):
            return self._step(state, frozen, images, t, matrix, noise_idx, noise_end, canvas=canvas)

    def _step(self, state: dict, frozen: dict, images: jax.Array, t: jax.Array, matrix: jax.Array,
              noise_idx: jax.Array, noise_end: jax.Array, *, canvas: int) -> tuple[dict, dict]:
        losses = self.config.losses
        step1 = state["step"] + 1  # the official code counts from 1
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        keys = jax.random.split(key, 8)
        k_model, k_gen_aug, k_gen_d, k_real, k_fake, k_strong, k_d, k_lpips = keys
        target = degrade(images, matrix)
        target2 = jnp.concatenate([target, target])
        if self.align:  # frozen SigLIP2 features of the clean full-resolution input (no gradient)
            align_target = siglip_target(self._siglip(), frozen["siglip"], images)

        def generator_loss(trainable):
            params = trainable["tokenizer"] if self.align else trainable
            out = self.model.apply({"params": params}, images, t, canvas, noise_idx, noise_end, k_model, True)
            recon, weight = out["recon"].astype(jnp.float32), out["recon_weight"]
            loss, metrics, disc_stats = self.image_losses(state["disc"], frozen, recon, target2, weight, step1,
                                                          (k_gen_aug, k_gen_d, k_lpips))
            loss = loss + out["vq_loss"] + out["commit_loss"]
            metrics.update(vq_loss=out["vq_loss"], commit_loss=out["commit_loss"],
                           codebook_usage=out["codebook_usage"], fea_cosine_sim=out["fea_cosine_sim"])
            if "entropy_loss" in out:
                loss = loss + out["entropy_loss"]
                metrics["entropy_loss"] = out["entropy_loss"]
            if self.align:  # token 1 of the clean half, straight-through (official global_token_learning)
                align = alignment_loss(trainable["align_proj"], out["quant"][:images.shape[0], 0], align_target)
                loss = loss + losses.align_weight * align
                metrics["align_loss"] = align
            metrics["loss"] = loss
            return loss, (metrics, recon, weight, disc_stats)

        trainable = self._trainable(state)
        grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
        (_, (metrics, recon, weight, disc_stats)), grads = grad_fn(trainable)
        updates, opt = self.tx.update(grads, state["opt"], trainable)
        new = dict(self._with_trainable(state, optax.apply_updates(trainable, updates)), opt=opt, step=step1)
        metrics["lr"] = self.lr(state["step"])
        metrics["grad_norm"] = optax.global_norm(grads)

        if self.disc is not None:
            disc = dict(state["disc"], **disc_stats)
            (d_loss, (lecam, variables, d_metrics)), d_grads = jax.value_and_grad(self.disc_loss, has_aux=True)(
                state["disc"]["params"], disc, frozen, jax.lax.stop_gradient(recon), target2, weight, step1,
                state["lecam"], (k_real, k_fake, k_strong, k_d))
            d_updates, disc_opt = self.disc_tx.update(d_grads, state["disc_opt"], state["disc"]["params"])
            variables["params"] = optax.apply_updates(state["disc"]["params"], d_updates)
            new.update(disc=variables, disc_opt=disc_opt, lecam=lecam)
            metrics.update(d_loss=d_loss, **d_metrics)
        return new, metrics

    def abstract_step_args(self, canvas: int, state: Any, frozen: dict) -> tuple:
        """ShapeDtypeStructs, shardings included, of the arguments of ``compiled(canvas)``: what it lowers on.
        ``state`` and ``frozen``: arrays or ShapeDtypeStructs (the state's carry their shardings)."""
        size = self.model_cfg.image_size
        repl = sharding.replicated(self.mesh)
        spec = lambda shape, dtype, sh=repl: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
        scalar = spec((), jnp.int32)
        return (jax.tree.map(lambda x: spec(x.shape, x.dtype, x.sharding), state),
                jax.tree.map(lambda x: spec(x.shape, x.dtype), frozen),
                spec((self.config.batch_size, size, size, 3), jnp.float32, sharding.batch_sharding(self.mesh, 4)),
                scalar, spec((canvas, size), jnp.float32), scalar, scalar)

    def compile_canvases(self, canvases: list[int], state: Any, frozen: dict, workers: int = 2) -> dict[int, Any]:
        """{canvas: compiled step} for every canvas, ``workers`` compiled at a time.

        All before the first step, so no step waits for a compile. The XLA compile itself runs without the GIL,
        but tracing and lowering hold it: on 2 CPU cores the main job's 4 canvases take 42.6 s one at a time and
        40.1 s two at a time (benchmarks/training.py). ``state``: the state or its ShapeDtypeStructs (shardings
        included); nothing is run.
        """
        shardings = jax.tree.map(lambda x: x.sharding, state)

        def compile_one(canvas):
            jitted = self.compiled(canvas, shardings, frozen)
            return jitted.lower(*self.abstract_step_args(canvas, state, frozen)).compile()

        with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
            return dict(zip(canvases, pool.map(compile_one, canvases)))

    def compiled(self, canvas: int, state_shardings: Any, frozen: dict):
        """The jitted step for one decoder canvas (compiled on first use, then reused)."""
        if canvas not in self._compiled:
            repl = sharding.replicated(self.mesh)
            images = sharding.batch_sharding(self.mesh, 4)
            frozen_sh = jax.tree.map(lambda _: repl, frozen)
            fn = lambda state, frozen, *args: self.step(state, frozen, *args, canvas=canvas)
            self._compiled[canvas] = jax.jit(
                fn, in_shardings=(state_shardings, frozen_sh, images, repl, repl, repl, repl),
                out_shardings=(state_shardings, repl), donate_argnums=0)
        return self._compiled[canvas]
