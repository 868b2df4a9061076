"""Shared config pieces: mesh recipes for common slices.

``mesh`` is ``(data, fsdp, tensor)``; -1 means "the rest of the devices". Use a recipe with
``--config.mesh=v5e-256``-style names through ``mesh_for(name)`` or set the three sizes directly.
"""

import ml_collections

# Recipes: data-parallel across hosts/slices, FSDP inside; tensor parallelism stays 1 at these model sizes.
MESH_RECIPES = {
    "cpu": (-1, 1, 1),         # one host, pure data parallel
    "1xgpu": (1, 1, 1),
    "8xH100": (1, 8, 1),       # one node: FSDP over NVLink
    "2x8xH100": (2, 8, 1),     # two nodes: data across nodes, FSDP inside
    "v4-128": (4, 16, 1),      # 64 chips (v4 counts TensorCores): 16 hosts x 4 chips
    "v5e-256": (16, 16, 1),    # 256 chips
}


def mesh_for(name: str) -> tuple[int, int, int]:
    if name not in MESH_RECIPES:
        raise KeyError(f"unknown mesh recipe {name!r}; known: {sorted(MESH_RECIPES)}")
    return MESH_RECIPES[name]


def mesh_config(shape=(-1, 1, 1)) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": shape[0], "fsdp": shape[1], "tensor": shape[2]})


def tokenizer_training(model: ml_collections.ConfigDict, data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Training fields of the tokenizer recipes; the values are the official ImageNet recipe (spec §1.1, §1.8)."""
    c = ml_collections.ConfigDict()
    c.model = model
    c.data = data
    c.seed = 42
    c.batch_size = 256           # global
    c.total_steps = 1_251_000     # 250 epochs x 5,004 steps
    c.mesh = mesh_config()
    c.degradation_prob = 0.2
    c.self_correction = True
    c.rounding = "ceil"          # decoder canvas rounding: "ceil" (official code) or "nearest" (paper)
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.95, warmup_steps=5_004, warmup_lr=1e-5, min_lr=1e-5, clip_norm=1.0))
    c.losses = ml_collections.ConfigDict(dict(
        mse_weight=1.0,
        lpips_weight=1.0, lpips_warmup=10_000, lpips_weights="",
        disc_type="dino", disc_weight=0.2, disc_start=40_000, dino_weights="",
        patchgan_width=64, patchgan_layers=3,
        lecam_weight=0.001, cr_weight=4.0, cr_policy="color,translation,cutout_0.5",
        diffaug_policy="color,translation,cutout_0.2", diffaug_prob=0.5))
    c.log_every = 50
    c.checkpoint_every = 5_000
    c.keep_checkpoints = 3
    c.image_every = 5_000
    c.eval_images = 64           # held-out images for the final PSNR curve and the PNG grids
    return c
