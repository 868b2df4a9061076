"""DetailFlow 1D tokenizer model configs.

    get_config("DF-16")                      # released DetailFlow-16 sizes (N = 128)
    get_config("DF-64,dtype=bfloat16")       # N = 512, bf16 compute
    get_config("tiny,N=64,g=8,C=16")         # small test model with overrides
    python -m detailflow_jax.convert.tokenizer --config configs/tokenizer.py:DF-16 ...
        --config.model.decoder.depth=6      # ml_collections flag overrides work on every field

Variants: DF-16 / DF-32 / DF-64 (SigLIP2-so400m 12-layer encoder, width-768 12-layer decoder,
codebook 8192×8, g = C = 8, 256² images; docs/model.md#configurations), and `tiny` / `small` for
tests and smoke runs. Argument keys (0 or "" = the variant's value): N, g, C, K (codebook size),
image, enc_width, enc_depth, enc_heads, enc_mlp, dec_width, dec_depth, dec_heads, dec_mlp, dtype,
remat.
"""

from __future__ import annotations

import ml_collections

from detailflow_jax import config_lib
from detailflow_jax.tokenizer.config import make_model_config

# SigLIP2-so400m, first 12 layers
_REAL_ENCODER = dict(width=1152, depth=12, heads=16, mlp_dim=4304)
_REAL_DECODER = dict(width=768, depth=12, heads=12, mlp_dim=3072)    # ViT-B-width SigLIP2 stack

VARIANTS = {
    "DF-16": dict(
        image_size=256,
        num_latent_tokens=128,
        group_size=8,
        causal_num=8,
        codebook_size=8192,
        encoder=_REAL_ENCODER,
        decoder=_REAL_DECODER,
    ),
    "DF-32": dict(
        image_size=256,
        num_latent_tokens=256,
        group_size=8,
        causal_num=8,
        codebook_size=8192,
        encoder=_REAL_ENCODER,
        decoder=_REAL_DECODER,
    ),
    "DF-64": dict(
        image_size=256,
        num_latent_tokens=512,
        group_size=8,
        causal_num=8,
        codebook_size=8192,
        encoder=_REAL_ENCODER,
        decoder=_REAL_DECODER,
    ),
    # Same geometry as the tiny_a parity fixture.
    "tiny": dict(
        image_size=64,
        num_latent_tokens=32,
        group_size=4,
        causal_num=4,
        codebook_size=64,
        encoder=dict(width=64, depth=2, heads=4, mlp_dim=256),
        decoder=dict(width=48, depth=2, heads=4, mlp_dim=192),
    ),
    "small": dict(
        image_size=128,
        num_latent_tokens=64,
        group_size=8,
        causal_num=8,
        codebook_size=1024,
        encoder=dict(width=256, depth=4, heads=4, mlp_dim=1024),
        decoder=dict(width=192, depth=4, heads=4, mlp_dim=768),
    ),
}

# Short argument name -> (section or None, field).
_ARG_KEYS = {
    "N": (None, "num_latent_tokens"),
    "g": (None, "group_size"),
    "C": (None, "causal_num"),
    "K": (None, "codebook_size"),
    "image": (None, "image_size"),
    "enc_width": ("encoder", "width"),
    "enc_depth": ("encoder", "depth"),
    "enc_heads": ("encoder", "heads"),
    "enc_mlp": ("encoder", "mlp_dim"),
    "dec_width": ("decoder", "width"),
    "dec_depth": ("decoder", "depth"),
    "dec_heads": ("decoder", "heads"),
    "dec_mlp": ("decoder", "mlp_dim"),
}


def model_config(variant: str) -> ml_collections.ConfigDict:
    """The model section of ``variant`` (a copy; edit freely)."""
    if variant not in VARIANTS:
        raise config_lib.ConfigError(
            f"variant={variant!r}: unknown tokenizer variant; known: {sorted(VARIANTS)}"
        )
    return make_model_config(**VARIANTS[variant])


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(
        arg, variant="DF-16", dtype="", remat=False, **{k: 0 for k in _ARG_KEYS}
    )
    config = ml_collections.ConfigDict()
    config.variant = arg.variant
    config.model = model_config(arg.variant)
    for key, (section, field) in _ARG_KEYS.items():
        if arg[key]:
            (config.model[section] if section else config.model)[field] = arg[key]
    if arg.dtype:
        config.model.dtype = arg.dtype
    config.model.remat = arg.remat or config.model.remat
    return config
