"""The tokenizer train step: generator update, then discriminator update, one jit per canvas
(docs/model.md#degradation, docs/fidelity.md#losses).

State (a plain pytree, checkpointed as is):
  step        int32, number of updates done
  rng         PRNG key; per-step keys are ``fold_in(rng, step)``
  params      tokenizer parameters (float32)
  align_proj  ``global_token_proj`` parameters of the alignment loss (only when losses.align_weight
              > 0)
  opt         Adam state of the tokenizer: of ``params``, or of {"tokenizer": params, "align_proj":
              align_proj} when the alignment loss is on (one optimiser and one gradient clip over
              both, as the official VQModel, which owns global_token_proj)
  disc        {"params", "batch_stats"} of the discriminator ({} when the GAN loss is off)
  disc_opt    Adam state of the discriminator
  lecam       LeCAM EMAs of the discriminator logits

Frozen networks (LPIPS-VGG, the DINO backbone, the SigLIP2 tower of the alignment loss) are
arguments, not state: they are converted from user files and never trained, and they are loaded
(``load_frozen``) or made abstract (``abstract_frozen``) before the step is built
(``make_tokenizer_step``). The decoder canvas is a static shape: the program holds one jitted step
per canvas; t, the degradation matrix and the noise span are traced inputs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from detailflow_jax import optim, sharding
from detailflow_jax.losses import diffaug, gan
from detailflow_jax.losses.alignment import (
    SiglipVisionTower,
    alignment_loss,
    init_projection,
    load_siglip_tower,
    siglip_target,
)
from detailflow_jax.losses.discriminator import DinoDiscriminator, load_dino_params
from detailflow_jax.losses.lpips import LPIPS, load_lpips_params
from detailflow_jax.losses.patchgan import PatchGANDiscriminator
from detailflow_jax.nn.resample import bicubic_resize
from detailflow_jax.tokenizer.config import TokenizerConfig, validate
from detailflow_jax.tokenizer.degradation import degrade
from detailflow_jax.tokenizer.model import DetailFlowTokenizer, init_variables
from detailflow_jax.tokenizer.resolution import ResolutionTables
from detailflow_jax.train.encoder_init import encoder_weights, with_pretrained_encoder

DISC_TYPES = ("none", "patchgan", "dino")


# ---------------------------------------------------------------------------------- frozen networks

@dataclasses.dataclass(frozen=True)
class FrozenNets:
    """The frozen networks the enabled losses need."""

    # {"lpips", "dino", "siglip"}: weights (arrays or ShapeDtypeStructs), arguments of the step
    params: dict
    siglip: SiglipVisionTower | None = None  # the alignment loss's tower, sized by its weights
    dino_heads: Any = None  # official discriminator heads to start from (None: random)


def _check_disc_type(config) -> None:
    if config.losses.disc_type not in DISC_TYPES:
        raise ValueError(
            f"losses.disc_type={config.losses.disc_type!r}: must be one of {DISC_TYPES}"
        )


def load_frozen(config: ml_collections.ConfigDict) -> FrozenNets:
    """The user-supplied frozen weights the enabled losses need (a clear error names any that are
    missing)."""
    _check_disc_type(config)
    losses, model_cfg = config.losses, validate(config.model)
    # the encoder's SigLIP2 start is checked here, loaded by the program's init
    encoder_weights(config)
    params, siglip, heads = {}, None, None
    if losses.lpips_weight > 0:
        params["lpips"] = load_lpips_params(losses.lpips_weights)
    if losses.disc_type == "dino":
        params["dino"], heads = load_dino_params(losses.dino_weights)
    if losses.align_weight > 0:
        siglip, params["siglip"] = load_siglip_tower(losses.siglip_weights, model_cfg.compute_dtype)
        if model_cfg.image_size % siglip.patch_size:
            raise ValueError(
                f"model.image_size={model_cfg.image_size} is not a multiple of the SigLIP2 "
                f"patch size {siglip.patch_size} (alignment loss); set losses.align_weight=0"
            )
    return FrozenNets(params, siglip, heads)


def abstract_frozen(config: ml_collections.ConfigDict) -> FrozenNets:
    """``load_frozen``'s networks as ShapeDtypeStructs of the real ones (DINO ViT-S/16, LPIPS-VGG16,
    SigLIP2-so400m), with no weight file read and nothing allocated: what ahead-of-time compiles
    take."""
    _check_disc_type(config)
    losses, model_cfg = config.losses, validate(config.model)
    key = jax.random.key(0)
    size = model_cfg.image_size
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    params, siglip = {}, None
    if losses.lpips_weight > 0:
        params["lpips"] = jax.eval_shape(LPIPS().init, key, image, image)
    if losses.disc_type == "dino":
        disc = DinoDiscriminator()
        dino_image = jax.ShapeDtypeStruct((1, disc.img_size, disc.img_size, 3), jnp.float32)
        params["dino"] = jax.eval_shape(disc.backbone().init, key, dino_image)["params"]
    if losses.align_weight > 0:
        siglip = SiglipVisionTower(dtype=model_cfg.compute_dtype)
        params["siglip"] = jax.eval_shape(siglip.init, key, image)["params"]
    return FrozenNets(nn.unbox(params), siglip)


# --------------------------------------------------------------------------------- the image losses

@dataclasses.dataclass(frozen=True)
class TokenizerLosses:
    """The generator's image losses and the discriminator's loss, as pure functions of their
    settings."""

    losses: ml_collections.ConfigDict  # config.losses
    image_size: int
    schedule: gan.GANSchedule
    lpips: LPIPS | None
    disc: nn.Module | None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> TokenizerLosses:
        _check_disc_type(config)
        losses = config.losses
        schedule = gan.GANSchedule(
            disc_start=losses.disc_start,
            disc_weight=losses.disc_weight,
            perceptual_weight=losses.lpips_weight,
            perceptual_warmup=losses.lpips_warmup,
            lecam_weight=losses.lecam_weight,
            cr_weight=losses.cr_weight,
        )
        disc = {
            "none": None,
            "patchgan": PatchGANDiscriminator(losses.patchgan_width, losses.patchgan_layers),
            "dino": DinoDiscriminator(),
        }[losses.disc_type]
        # Dropout in the LPIPS heads while training, as in the official loss module (train mode).
        lpips = LPIPS(dropout_rate=losses.lpips_dropout) if losses.lpips_weight > 0 else None
        return cls(losses, validate(config.model).image_size, schedule, lpips, disc)

    def disc_logits(self, variables: dict, images: jax.Array, frozen: dict, key: jax.Array,
                    weight: jax.Array):
        """Discriminator logits in train mode and the updated batch_stats.

        Only samples of nonzero weight enter the batch statistics: at t = 1 the official
        discriminator sees the B clean images alone.
        """
        mask = weight > 0
        if self.losses.disc_type == "dino":
            return self.disc.apply(
                variables, images, frozen["dino"], True, key, mask, mutable=["batch_stats"]
            )
        size = self.image_size
        if images.shape[1] != size:  # PatchGAN sees every canvas at full size, as DINO sees 224.
            images = bicubic_resize(images, (size, size))
        return self.disc.apply(variables, images, True, mask, mutable=["batch_stats"])

    def image_losses(
        self,
        disc: dict,
        frozen: dict,
        recon: jax.Array,
        target: jax.Array,
        weight: jax.Array,
        step1: jax.Array,
        keys: tuple,
    ) -> tuple[jax.Array, dict, dict]:
        """The generator's losses on the decoded images (official ``VQLoss.forward``, optimizer_idx
        0): MSE, LPIPS and the adversarial term, weighted for the 1-based ``step1``. ``keys`` =
        (DiffAugment, DINO crop, LPIPS dropout). Returns (weighted sum, metrics, the discriminator's
        batch_stats after its call)."""
        losses = self.losses
        k_aug, k_disc, k_lpips = keys
        mse = gan.sample_mean(jnp.mean((recon - target) ** 2, axis=(1, 2, 3)), weight)
        loss = losses.mse_weight * mse
        metrics, disc_stats = dict(mse=mse), {}
        if self.lpips is not None:
            lp = gan.sample_mean(
                self.lpips.apply(frozen["lpips"], target, recon, True, rngs={"dropout": k_lpips}),
                weight,
            )
            loss = loss + self.schedule.perceptual(step1) * lp
            metrics["lpips"] = lp
        if self.disc is not None:
            fake = diffaug.diff_augment(k_aug, recon, losses.diffaug_policy, losses.diffaug_prob)
            logits, disc_stats = self.disc_logits(disc, fake, frozen, k_disc, weight)
            g_adv = gan.hinge_g_loss(logits, weight)
            loss = loss + self.schedule.adversarial(step1) * g_adv
            metrics["g_adv"] = g_adv
        return loss, metrics, disc_stats

    def disc_loss(
        self,
        disc_params: Any,
        disc: dict,
        frozen: dict,
        fake: jax.Array,
        target: jax.Array,
        weight: jax.Array,
        step1: jax.Array,
        lecam: gan.LeCAMState,
        keys: tuple,
    ):
        """The discriminator's loss (official ``VQLoss.forward``, optimizer_idx 1) from the
        variables ``disc`` left by the generator's call. ``keys`` = (DiffAugment real, fake, strong;
        DINO crops). Returns (loss, (new LeCAM state, variables after the calls, metrics))."""
        losses = self.losses
        k_real, k_fake, k_strong, k_d = keys
        # DINO draws a crop at every call (official FrozenDINOSmallNoDrop.forward).
        k_d_real, k_d_fake, k_d_strong_real, k_d_strong_fake = jax.random.split(k_d, 4)
        # Every train-mode call runs a power iteration and a BatchNorm update; the official module
        # keeps them all: generator's call, real, fake, strong real, strong fake.
        variables = dict(disc, params=disc_params)

        def logits(images, crop_key):
            nonlocal variables
            out, mut = self.disc_logits(variables, images, frozen, crop_key, weight)
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
        loss, lecam, m = gan.discriminator_loss(
            self.schedule, step1, lecam, real_logits, fake_logits, **strong, weight=weight
        )
        return loss, (lecam, variables, m)


# -------------------------------------------------------------------------------------- the program

class TokenizerProgram(NamedTuple):
    """Everything a tokenizer run needs, built once by ``make_tokenizer_step``; every member is a
    pure function or a value."""

    model_cfg: TokenizerConfig
    tables: ResolutionTables
    init: Callable[[int], dict]  # seed -> the initial state, born sharded on the mesh
    abstract_state: Any  # the state's ShapeDtypeStructs with their shardings (restore target)
    state_shardings: Any
    # canvas -> jitted (state, frozen params, images, t, matrix, noise_idx, noise_end) -> (state,
    # metrics)
    steps: dict
    # (canvas, state or its ShapeDtypeStructs) -> what a step of that canvas lowers on
    step_args: Callable
    lr: optax.Schedule
    losses: TokenizerLosses


def _is_decoder_param(path: tuple) -> bool:
    """Whether a leaf of the trainable tree trains under finetune_decoder_only (official: names
    containing 'decoder.' or 'post_quant_conv'); the alignment projection stays frozen."""
    keys = [getattr(k, "key", None) for k in path]
    keys = keys[1:] if keys[0] == "tokenizer" else keys
    return keys[0] in ("decoder", "post_quant_conv")


def make_tokenizer_step(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    frozen: FrozenNets,
    lr_schedule: optim.ResolvedSchedule | None = None,
    losses: TokenizerLosses | None = None,
) -> TokenizerProgram:
    """The state's init and the per-canvas jitted steps of a training config. ``frozen``:
    ``load_frozen`` or ``abstract_frozen`` of the same config; ``lr_schedule``: the run's step
    counts (``optim.resolve_tokenizer_schedule``; None: from the config's explicit step counts
    alone); ``losses``: other loss modules (e.g. another discriminator) than the config's."""
    lr_schedule = lr_schedule or optim.resolve_tokenizer_schedule(config, dataset_size=None)
    model_cfg = validate(config.model)
    model = DetailFlowTokenizer(model_cfg)
    rules = sharding.rules_from_config(config)
    losses = losses or TokenizerLosses.from_config(config)
    align = config.losses.align_weight > 0
    lr = optim.tokenizer_schedule(lr_schedule)
    tx = optim.adam(lr, config.optim.b1, config.optim.b2, config.optim.clip_norm)
    if config.get("finetune_decoder_only", False):
        tx = optim.train_only(tx, _is_decoder_param)
    disc_tx = optim.adam(lr, config.optim.b1, config.optim.b2, config.optim.clip_norm)
    if align and frozen.siglip is None:
        raise ValueError(
            "losses.align_weight > 0 but the frozen networks hold no SigLIP2 tower: build them "
            "with load_frozen(config) or abstract_frozen(config) of this config"
        )

    def trainable_of(state: dict) -> Any:
        """What the tokenizer's Adam optimises: the tokenizer, plus global_token_proj with the
        alignment loss."""
        return (
            {"tokenizer": state["params"], "align_proj": state["align_proj"]}
            if align
            else state["params"]
        )

    def with_trainable(state: dict, trainable: Any) -> dict:
        if align:
            return dict(state, params=trainable["tokenizer"], align_proj=trainable["align_proj"])
        return dict(state, params=trainable)

    def init_state(rng: jax.Array, dino_backbone=None) -> dict:
        k_model, k_disc, k_state = jax.random.split(rng, 3)
        params = init_variables(model_cfg, k_model)["params"]
        state = dict(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(k_state), params=params,
                     disc={}, disc_opt=optax.EmptyState(), lecam=gan.lecam_init())
        if align:  # its own key, so the tokenizer's initialisation does not depend on the loss
            state["align_proj"] = init_projection(
                jax.random.fold_in(rng, 1), model_cfg.codebook_dim, frozen.siglip.width
            )
        state["opt"] = tx.init(trainable_of(state))
        if losses.disc is not None:
            dummy = jnp.zeros((1, model_cfg.image_size, model_cfg.image_size, 3), jnp.float32)
            args = (dummy, dino_backbone, False) if dino_backbone is not None else (dummy, False)
            disc = dict(losses.disc.init(k_disc, *args))
            state["disc"] = disc
            state["disc_opt"] = disc_tx.init(disc["params"])
        return state

    backbone = frozen.params.get("dino")
    # The backbone is an argument (not a closure) so abstract frozen weights work too; the seed
    # changes no shape.
    abstract = sharding.abstract_sharded(init_state, mesh, jax.random.key(0), backbone, rules=rules)
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract)

    def init(seed: int) -> dict:
        """The initial state, born sharded (the encoder from SigLIP2 when ``encoder_pretrained``; a
        resumed run restores its checkpoint instead)."""
        state, _ = sharding.init_sharded(
            init_state, mesh, jax.random.key(seed), backbone, rules=rules
        )
        if path := encoder_weights(config):  # Adam's moments start at zero whatever the values
            state["params"] = with_pretrained_encoder(
                state["params"], state_shardings["params"], path, model_cfg
            )
        if frozen.dino_heads is not None:  # official heads given: start from them
            state["disc"] = jax.device_put(frozen.dino_heads, state_shardings["disc"])
        return state

    def step(state: dict, frozen_params: dict, images: jax.Array, t: jax.Array, matrix: jax.Array,
             noise_idx: jax.Array, noise_end: jax.Array, *, canvas: int) -> tuple[dict, dict]:
        step1 = state["step"] + 1  # the official code counts from 1
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        k_model, k_gen_aug, k_gen_d, k_real, k_fake, k_strong, k_d, k_lpips = jax.random.split(
            key, 8
        )
        target = degrade(images, matrix)
        target2 = jnp.concatenate([target, target])
        if align:  # frozen SigLIP2 features of the clean full-resolution input (no gradient)
            align_target = siglip_target(frozen.siglip, frozen_params["siglip"], images)

        def generator_loss(trainable):
            params = trainable["tokenizer"] if align else trainable
            out = model.apply(
                {"params": params}, images, t, canvas, noise_idx, noise_end, k_model, True
            )
            recon, weight = out["recon"].astype(jnp.float32), out["recon_weight"]
            loss, metrics, disc_stats = losses.image_losses(
                state["disc"],
                frozen_params,
                recon,
                target2,
                weight,
                step1,
                (k_gen_aug, k_gen_d, k_lpips),
            )
            loss = loss + out["vq_loss"] + out["commit_loss"]
            metrics.update(
                vq_loss=out["vq_loss"],
                commit_loss=out["commit_loss"],
                codebook_usage=out["codebook_usage"],
                fea_cosine_sim=out["fea_cosine_sim"],
            )
            if "entropy_loss" in out:
                loss = loss + out["entropy_loss"]
                metrics["entropy_loss"] = out["entropy_loss"]
            # token 1 of the clean half, straight-through (official global_token_learning)
            if align:
                aligned = alignment_loss(
                    trainable["align_proj"], out["quant"][: images.shape[0], 0], align_target
                )
                loss = loss + config.losses.align_weight * aligned
                metrics["align_loss"] = aligned
            metrics["loss"] = loss
            return loss, (metrics, recon, weight, disc_stats)

        trainable = trainable_of(state)
        (_, (metrics, recon, weight, disc_stats)), grads = jax.value_and_grad(
            generator_loss, has_aux=True
        )(trainable)
        updates, opt = tx.update(grads, state["opt"], trainable)
        new = dict(
            with_trainable(state, optax.apply_updates(trainable, updates)), opt=opt, step=step1
        )
        metrics["lr"] = lr(state["step"])
        metrics["grad_norm"] = optax.global_norm(grads)

        if losses.disc is not None:
            disc = dict(state["disc"], **disc_stats)
            (d_loss, (lecam, variables, d_metrics)), d_grads = jax.value_and_grad(
                losses.disc_loss, has_aux=True
            )(
                state["disc"]["params"],
                disc,
                frozen_params,
                jax.lax.stop_gradient(recon),
                target2,
                weight,
                step1,
                state["lecam"],
                (k_real, k_fake, k_strong, k_d),
            )
            d_updates, disc_opt = disc_tx.update(
                d_grads, state["disc_opt"], state["disc"]["params"]
            )
            variables["params"] = optax.apply_updates(state["disc"]["params"], d_updates)
            new.update(disc=variables, disc_opt=disc_opt, lecam=lecam)
            metrics.update(d_loss=d_loss, **d_metrics)
        return new, metrics

    repl = sharding.replicated(mesh)
    images_sharding = sharding.batch_sharding(mesh, 4)
    frozen_shardings = jax.tree.map(lambda _: repl, frozen.params)

    def jitted_step(canvas: int):
        def canvas_step(state, frozen_params, *args):
            # The rules in context while tracing turn the models' activation constraints on
            # (`sharding.constrain`).
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
                return step(state, frozen_params, *args, canvas=canvas)

        return jax.jit(
            canvas_step,
            in_shardings=(
                state_shardings,
                frozen_shardings,
                images_sharding,
                repl,
                repl,
                repl,
                repl,
            ),
            out_shardings=(state_shardings, repl),
            donate_argnums=0,
        )

    def step_args(canvas: int, state: Any) -> tuple:
        size = model_cfg.image_size
        spec = lambda shape, dtype, sh=repl: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
        scalar = spec((), jnp.int32)
        return (jax.tree.map(lambda x: spec(x.shape, x.dtype, x.sharding), state),
                jax.tree.map(lambda x: spec(x.shape, x.dtype), frozen.params),
                spec((config.batch_size, size, size, 3), jnp.float32, images_sharding),
                scalar, spec((canvas, size), jnp.float32), scalar, scalar)

    tables = ResolutionTables.from_model_config(model_cfg, rounding=config.rounding)
    return TokenizerProgram(model_cfg=model_cfg, tables=tables, init=init, abstract_state=abstract,
                            state_shardings=state_shardings,
                            steps={canvas: jitted_step(canvas) for canvas in tables.canvas_sizes},
                            step_args=step_args, lr=lr, losses=losses)


def compile_canvases(
    program: TokenizerProgram, canvases: list[int], workers: int = 2
) -> dict[int, Any]:
    """{canvas: compiled step} for every canvas, ``workers`` compiled at a time.

    All before the first step, so no step waits for a compile. The XLA compile itself runs without
    the GIL, but tracing and lowering hold it: on 2 CPU cores the main job's 4 canvases take 42.6 s
    one at a time and 40.1 s two at a time (benchmarks/training.py). Nothing is run.
    """
    def compile_one(canvas):
        return (
            program.steps[canvas]
            .lower(*program.step_args(canvas, program.abstract_state))
            .compile()
        )

    with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
        return dict(zip(canvases, pool.map(compile_one, canvases)))
