"""DetailFlow AR model (LlamaGen GPT) configs.

    get_config("L/128")                      # released DetailFlow-16 GPT-L (N = 128, g = C = 8)
    get_config("B/128,g=16")                 # GPT-B, groups of 16 (C follows g unless given)
    get_config("XL/256,C=16,dtype=bfloat16,scan,remat")
    get_config("tiny")                       # 2 layers, width 64, N = 32, vocab 64, for tests and smoke runs
    python -m detailflow_jax.convert.gpt --config configs/gpt.py:L/128 --checkpoint ... --out ...

The variant is NAME[/N] with NAME in B, L, XL, XLPlus, XXL, XXLPlus, XXXL (official LlamaGen sizes)
or `tiny`. Argument keys (0 = the variant's value): g (group size), C (causal_num), K (vocab =
codebook size), classes, dim, layers, heads, multiple_of, dtype, scan, remat, remat_policy (full,
dots_saveable, ...: what a rematerialised block keeps), cfg (sampling CFG scale; 0 = the README
value for N).
"""  # noqa: E501

from __future__ import annotations

import dataclasses

import ml_collections

from detailflow_jax import config_lib
from detailflow_jax.ar.model import VARIANTS, GPTConfig

# Sizes of `tiny`: (n_layer, n_head, dim, N, g, vocab, classes, multiple_of).
_TINY = dict(
    n_layer=2,
    n_head=4,
    dim=64,
    num_tokens=32,
    group_size=4,
    vocab_size=64,
    num_classes=10,
    multiple_of=32,
)
# Official eval CFG per token count (scripts/eval_c2i.sh; docs/fidelity.md#sampling).
_README_CFG = {128: 1.45, 256: 1.5, 512: 1.32}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = config_lib.parse_arg(
        arg,
        variant="L/128",
        g=0,
        C=0,
        K=0,
        classes=0,
        dim=0,
        layers=0,
        heads=0,
        multiple_of=0,
        dtype="float32",
        scan=False,
        remat=False,
        remat_policy="full",
        cfg=0.0,
    )
    name, _, n = a.variant.partition("/")
    if name == "tiny":
        base = dict(_TINY)
    elif name in VARIANTS:
        n_layer, n_head, dim = VARIANTS[name]
        base = dict(n_layer=n_layer, n_head=n_head, dim=dim, num_tokens=128, group_size=8)
    else:
        raise config_lib.ConfigError(
            f"variant={a.variant!r}: unknown GPT variant; use NAME[/N] with NAME in "
            f"{sorted(VARIANTS) + ['tiny']}"
        )
    if n:
        config_lib.require(
            n.isdigit(), "variant", a.variant, "the part after '/' is the token count N, e.g. L/128"
        )
        base["num_tokens"] = int(n)
    overrides = dict(
        group_size=a.g,
        causal_num=a.C,
        vocab_size=a.K,
        num_classes=a.classes,
        dim=a.dim,
        n_layer=a.layers,
        n_head=a.heads,
        multiple_of=a.multiple_of,
    )
    base.update({k: v for k, v in overrides.items() if v})
    base.setdefault("causal_num", base.get("group_size", 8))  # C follows g unless given
    base.update(dtype=a.dtype, scan_layers=a.scan, remat=a.remat, remat_policy=a.remat_policy)

    model = GPTConfig(**base).validate()
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dataclasses.asdict(model))
    config.sampling = ml_collections.ConfigDict(
        dict(
            cfg_scale=a.cfg or _README_CFG.get(model.num_tokens, 1.5),
            cfg_schedule="constant",
            cfg_interval=-1,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
        )
    )
    config_lib.require(
        config.sampling.cfg_scale >= 1.0, "cfg", config.sampling.cfg_scale, "must be >= 1"
    )
    return config


def model_config(config: ml_collections.ConfigDict) -> GPTConfig:
    """The validated, frozen GPTConfig of a config from get_config (after any command-line
    overrides)."""
    return GPTConfig(**config.model.to_dict()).validate()
