"""Shared config pieces: the device mesh with its recipes for common slices, and the training fields
of the recipes.

``config.mesh`` holds the sizes of the mesh axes ``(data, fsdp, tensor)``; -1 means "the rest of the
devices". The trainers resolve it against the device count and check every sharded dimension
(parameters, batch) before anything is allocated. Three ways to set it:

    config.mesh = mesh_config(mesh_for("8xH100"))            # in a config file, from a recipe
    --config.mesh.data=2 --config.mesh.fsdp=8                # on the command line, sizes
    launch/run_on_host.sh --recipe 2x8xH100 -- ...           # a launcher recipe (adds the three overrides below)

``python -m configs.common mesh-flags NAME`` prints the command-line overrides of recipe NAME (used
by launch/).
"""  # noqa: E501

import sys

import ml_collections

# Recipes: data parallel across hosts or slices, FSDP inside the fast interconnect (NVLink, one TPU
# slice's ICI); tensor parallelism stays 1 at DetailFlow's model sizes (GPT-L: 24 layers x 1024).
# Sizes are devices as JAX counts them: TPU v4 and v5p devices are chips (2 TensorCores each,
# "v4-128" = 64 chips on 16 hosts); v5e/v6e slices are named by chips; a GPU is one device.
MESH_RECIPES = {
    "cpu": (-1, 1, 1),         # one host (or FAKE_DEVICES), pure data parallel
    "1xgpu": (1, 1, 1),
    "8xH100": (1, 8, 1),       # one node, 8 GPUs: FSDP over NVLink
    "2x8xH100": (2, 8, 1),     # two nodes: data across nodes (InfiniBand), FSDP inside each
    "v4-8": (1, 4, 1),         # 4 chips, one host
    "v4-128": (4, 16, 1),      # 64 chips, 16 hosts x 4
    "v5e-8": (1, 8, 1),        # 8 chips, one host
    "v5e-256": (16, 16, 1),    # 256 chips, 64 hosts x 4
    "v5p-128": (4, 16, 1),     # 64 chips, 16 hosts x 4
}


def mesh_for(name: str) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes of recipe ``name``."""
    if name not in MESH_RECIPES:
        raise KeyError(f"unknown mesh recipe {name!r}; known: {sorted(MESH_RECIPES)}")
    return MESH_RECIPES[name]


def mesh_config(shape: str | tuple[int, int, int] = (-1, 1, 1)) -> ml_collections.ConfigDict:
    """``config.mesh`` from (data, fsdp, tensor) sizes or a recipe name."""
    data, fsdp, tensor = mesh_for(shape) if isinstance(shape, str) else shape
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def mesh_overrides(name: str) -> list[str]:
    """Command-line overrides that set ``config.mesh`` to recipe ``name``."""
    return [f"--config.mesh.{axis}={size}" for axis, size in mesh_config(name).items()]


def _sharding_rules() -> ml_collections.ConfigDict:
    from detailflow_jax import sharding  # imported here: `mesh-flags` needs no jax
    return sharding.rules_config()


def tokenizer_training(
    model: ml_collections.ConfigDict, data: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """Training fields of the tokenizer recipes; the official ImageNet values
    (docs/fidelity.md#losses)."""
    c = ml_collections.ConfigDict()
    c.model = model
    c.data = data
    c.seed = 42
    c.batch_size = 256           # global
    c.epochs = 250               # official README (yaml 50): 1,251,000 steps of 5,004 at batch 256
    c.total_steps = 0            # 0: epochs x steps per epoch (images // batch_size); > 0: that
                                 # many steps
    c.mesh = mesh_config()
    c.sharding_rules = _sharding_rules()  # logical axis name -> mesh axes
    # Encoder start: random, or the SigLIP2 tower's first encoder.depth layers (official
    # encoder_pretrained; the directory comes from python -m detailflow_jax.convert.siglip2, e.g.
    # the one of losses.siglip_weights).
    c.encoder_pretrained = False
    c.encoder_weights = ""
    c.degradation_prob = 0.2
    c.self_correction = True
    c.rounding = "ceil"          # decoder canvas rounding: "ceil" (official code) or "nearest"
                                 # (paper)
    c.compile_workers = 2        # canvases' train steps compiled at a time before the loop (tracing
                                 # holds the GIL)
    # Official --finetune-decoder: only the decoder and post_quant_conv train; the encoder,
    # quant_conv, codebook, refine_conv and the alignment projection keep their values and get no
    # optimiser state.
    c.finetune_decoder_only = False
    # Official: lr x batch / 256 (lr_batch; 0 = no scaling), 1 warm-up epoch from 1e-5 (warmup_steps
    # -1: from warmup_epochs; >= 0: that many steps), cosine to min_lr_ratio x the scaled lr
    # (optim.py).
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, lr_batch=256, b1=0.9, b2=0.95, warmup_epochs=1.0, warmup_steps=-1, warmup_lr=1e-5,
        min_lr_ratio=0.1, clip_norm=1.0))
    c.losses = ml_collections.ConfigDict(dict(
        mse_weight=1.0,
        # Official LPIPS heads keep Dropout(0.5) active in training; 0 makes the perceptual loss
        # deterministic.
        lpips_weight=1.0, lpips_warmup=10_000, lpips_weights="", lpips_dropout=0.5,
        disc_type="dino", disc_weight=0.2, disc_start=40_000, dino_weights="",
        patchgan_width=64, patchgan_layers=3,
        lecam_weight=0.001, cr_weight=4.0, cr_policy="color,translation,cutout_0.5",
        diffaug_policy="color,translation,cutout_0.2", diffaug_prob=0.5,
        # Alignment of token 1 with a frozen SigLIP2-so400m (README --global-token-loss-weight 1);
        # the directory comes from python -m detailflow_jax.convert.siglip2.
        align_weight=1.0, siglip_weights=""))
    c.log_every = 50
    c.checkpoint_every = 5_000
    c.keep_checkpoints = 3
    c.image_every = 5_000
    c.eval_images = 64           # held-out images for the final PSNR curve and the PNG grids
    return c



def ar_training(gpt: ml_collections.ConfigDict, extract_data: ml_collections.ConfigDict,
                views: str) -> ml_collections.ConfigDict:
    """Every field of an AR recipe; the values are the official ImageNet ones
    (docs/fidelity.md#training)."""
    c = ml_collections.ConfigDict()
    c.model = gpt.model                # GPTConfig fields; N, g, C, vocab and classes must match the
                                       # codes
    c.sampling = gpt.sampling          # cfg_scale, temperature, top_k, top_p, ... for the sample
                                       # grids
    c.codes_dir = ""                   # written by python -m detailflow_jax.tokenizer.extract
    c.tokenizer = ""                   # for sample grids; "" = the tokenizer recorded in the codes'
                                       # metadata
    c.tokenizer_config = ""            # FILE.py:ARG when `tokenizer` is a converted parameter
                                       # directory
    c.extract = ml_collections.ConfigDict(dict(
        data=extract_data, split="train",
        views=views,                   # center (1) | center_flip (2) | ten_crop (10, official)
        batch_size=256,                # images per tokenizer pass on each process
        chunk_size=10_000,             # images per committed chunk file (the unit of resumption)
        max_images=0,                  # > 0: only the first max_images images of the split (smoke
                                       # runs)
        seed=0,                        # noise spans and noisy codes come from (seed, image index)
        dtype="",                      # tokenizer compute dtype; "" = its config's (the official
                                       # run used bf16)
    ))
    c.seed = 0
    c.batch_size = 256                 # global
    c.epochs = 300
    c.total_steps = 0                  # 0: epochs x steps per epoch (code records // batch_size)
    c.grad_accum = 1                   # micro-batches per step (same result in expectation, less
                                       # memory)
    c.mesh = mesh_config()
    # logical axis name -> mesh axes, for parameters and activations
    c.sharding_rules = _sharding_rules()
    c.correction_prob = 0.3
    # Official train_c2i.py: the lr is not scaled with the batch (lr_batch 0), warm-up int(5% x
    # total steps) (warmup_steps -1; >= 0: that many) from 0.005 x lr, cosine to 0.01 x lr
    # (optim.py).
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-4,
            lr_batch=0,
            b1=0.9,
            b2=0.95,
            weight_decay=0.05,
            warmup_fraction=0.05,
            warmup_steps=-1,
            warmup_lr_ratio=0.005,
            min_lr_ratio=0.01,
            clip_norm=1.0,
        )
    )
    c.ema_decay = 0.9999
    c.data_threads = 8                 # grain read threads per process
    c.log_every = 50
    c.checkpoint_every = 10_008        # 2 epochs at batch 256
    c.keep_checkpoints = 10
    c.sample_every = 10_008            # class-conditional PNG grids (EMA weights) when the
                                       # tokenizer is available
    c.sample_classes = ()              # () = every class (at most 16 are shown); else the class ids
                                       # for the rows
    c.samples_per_class = 8
    c.sample_seed = 0
    return c


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "mesh-flags":
        sys.exit(
            f"usage: python -m configs.common mesh-flags NAME   (NAME: {', '.join(MESH_RECIPES)})"
        )
    try:
        print(" ".join(mesh_overrides(sys.argv[2])))
    except KeyError as e:
        sys.exit(f"error: {e.args[0]}")
