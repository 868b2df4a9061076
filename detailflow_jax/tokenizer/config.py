"""Tokenizer model config: validation, a frozen (hashable) view for the Linen modules, and fixture
configs.

The model section (``config.model`` of ``configs/tokenizer.py``) has the fields
image_size, patch_size, pos_grid, num_latent_tokens, group_size, causal_num, codebook_size,
codebook_dim, ln_eps, commit_beta, vq_loss_ratio, entropy_loss_ratio, noise_top_k, dtype,
param_dtype, quantizer_distances, remat, and encoder / decoder = {width, depth, heads, mlp_dim}.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections

from detailflow_jax.config_lib import ConfigError, require

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# "auto": the compute dtype. The official quantizer's code-distance einsum runs in bf16 under bf16
# autocast (in training and code extraction); "float32" keeps it exact whatever the compute dtype.
DISTANCE_DTYPES = ("auto", "float32", "bfloat16")

# Fixed by the released architecture (docs/model.md#configurations); sizes per variant in
# configs/tokenizer.py.
ARCH_DEFAULTS = dict(
    patch_size=16,
    pos_grid=16,
    codebook_dim=8,
    ln_eps=1e-6,
    commit_beta=0.25,
    vq_loss_ratio=1.0,
    entropy_loss_ratio=0.0,
    noise_top_k=50,
    dtype="float32",
    param_dtype="float32",
    quantizer_distances="auto",
    remat=False,
)
# The fields a model config may lack (configs saved before they existed): ARCH_DEFAULTS fills them
# in.
_ADDED_LATER = (
    "ln_eps",
    "commit_beta",
    "vq_loss_ratio",
    "entropy_loss_ratio",
    "quantizer_distances",
    "remat",
)


def make_model_config(
    encoder: Mapping[str, int], decoder: Mapping[str, int], **sizes
) -> ml_collections.ConfigDict:
    """A model config from sizes (image_size, num_latent_tokens, group_size, causal_num,
    codebook_size, ...) plus ``encoder``/``decoder`` = {width, depth, heads, mlp_dim}; everything
    else from ARCH_DEFAULTS."""
    model = ml_collections.ConfigDict({**ARCH_DEFAULTS, **sizes})
    model.encoder = ml_collections.ConfigDict(dict(encoder))
    model.decoder = ml_collections.ConfigDict(dict(decoder))
    return model


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    width: int
    depth: int
    heads: int
    mlp_dim: int


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Validated, immutable tokenizer config (what the Linen modules hold)."""

    image_size: int
    patch_size: int
    pos_grid: int
    num_latent_tokens: int
    group_size: int
    causal_num: int
    codebook_size: int
    codebook_dim: int
    ln_eps: float
    commit_beta: float
    vq_loss_ratio: float
    entropy_loss_ratio: float
    noise_top_k: int
    dtype: str
    param_dtype: str
    quantizer_distances: str
    remat: bool
    encoder: ViTConfig
    decoder: ViTConfig

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def distance_dtype(self) -> str:
        """The dtype of the quantizer's code distances: ``quantizer_distances``, "auto" meaning
        ``dtype``."""
        return self.dtype if self.quantizer_distances == "auto" else self.quantizer_distances


def validate(model_cfg: Any) -> TokenizerConfig:
    """Checks every rule the model relies on; raises ConfigError naming the key. Returns the frozen
    config."""
    if isinstance(model_cfg, TokenizerConfig):
        return model_cfg
    m = {**{k: ARCH_DEFAULTS[k] for k in _ADDED_LATER}, **_as_dict(model_cfg)}
    for key in (
        "image_size",
        "patch_size",
        "pos_grid",
        "num_latent_tokens",
        "group_size",
        "causal_num",
        "codebook_size",
        "codebook_dim",
        "noise_top_k",
    ):
        require(key in m, key, None, "is required in the tokenizer model config")
        require(isinstance(m[key], int) and m[key] > 0, key, m[key], "must be a positive integer")
    n, g, c = m["num_latent_tokens"], m["group_size"], m["causal_num"]
    require(n % g == 0, "num_latent_tokens", n, f"must be a multiple of group_size={g}")
    require(c % g == 0, "causal_num", c, f"must be a multiple of group_size={g}")
    require(c <= n, "causal_num", c, f"must be at most num_latent_tokens={n}")
    require(m["image_size"] % m["patch_size"] == 0, "image_size", m["image_size"],
            f"must be a multiple of patch_size={m['patch_size']}")
    require(m["codebook_dim"] == 8, "codebook_dim", m["codebook_dim"],
            "must be 8 (the released quant_conv/codebook width)")
    require(m["noise_top_k"] <= m["codebook_size"], "noise_top_k", m["noise_top_k"],
            f"must be at most codebook_size={m['codebook_size']} (top-k of the codebook)")
    require(float(m["entropy_loss_ratio"]) >= 0, "entropy_loss_ratio", m["entropy_loss_ratio"],
            "must be >= 0 (0 turns the entropy loss off, as in every released config)")
    for key in ("dtype", "param_dtype"):
        require(m.get(key) in _DTYPES, key, m.get(key), f"must be one of {sorted(_DTYPES)}")
    distances = m["quantizer_distances"]
    require(
        distances in DISTANCE_DTYPES,
        "quantizer_distances",
        distances,
        f"must be one of {DISTANCE_DTYPES}",
    )
    vits = {}
    for part in ("encoder", "decoder"):
        sub = _as_dict(m.get(part) or {})
        for field in ("width", "depth", "heads", "mlp_dim"):
            require(
                isinstance(sub.get(field), int) and sub[field] > 0,
                f"{part}.{field}",
                sub.get(field),
                "must be a positive integer",
            )
        require(sub["width"] % sub["heads"] == 0, f"{part}.heads", sub["heads"],
                f"must divide {part}.width={sub['width']}")
        vits[part] = ViTConfig(**{f: sub[f] for f in ("width", "depth", "heads", "mlp_dim")})
    return TokenizerConfig(
        image_size=m["image_size"],
        patch_size=m["patch_size"],
        pos_grid=m["pos_grid"],
        num_latent_tokens=n,
        group_size=g,
        causal_num=c,
        codebook_size=m["codebook_size"],
        codebook_dim=m["codebook_dim"],
        ln_eps=float(m["ln_eps"]),
        commit_beta=float(m["commit_beta"]),
        vq_loss_ratio=float(m["vq_loss_ratio"]),
        entropy_loss_ratio=float(m["entropy_loss_ratio"]),
        noise_top_k=m["noise_top_k"],
        dtype=m["dtype"],
        param_dtype=m["param_dtype"],
        quantizer_distances=distances,
        remat=bool(m["remat"]),
        **vits,
    )


def check_canvas(cfg: TokenizerConfig, canvas: int) -> None:
    """A decoder canvas must be a positive multiple of the patch size."""
    if not isinstance(canvas, int) or canvas <= 0 or canvas % cfg.patch_size:
        raise ConfigError(f"canvas={canvas!r}: the decoder canvas must be a positive multiple of "
                          f"patch_size={cfg.patch_size} (a static Python int)")


def from_fixture_config(fixture: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Model config for an official-parity folder's config.json (MLP hidden = 4·width there)."""
    vits = {part: dict(width=int(fixture[part]["width"]), depth=int(fixture[part]["layers"]),
                       heads=int(fixture[part]["heads"]), mlp_dim=4 * int(fixture[part]["width"]))
            for part in ("encoder", "decoder")}
    model = make_model_config(**vits, **{key: int(fixture[key]) for key in (
        "image_size", "num_latent_tokens", "group_size", "causal_num", "codebook_size")})
    # Parity fixtures may use codebooks smaller than the official top-50 (only training draws from
    # it).
    model.noise_top_k = min(model.noise_top_k, model.codebook_size)
    return model


def _as_dict(cfg: Any) -> dict:
    if isinstance(cfg, ml_collections.ConfigDict):
        return cfg.to_dict()
    if isinstance(cfg, ml_collections.FrozenConfigDict):
        return dict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"model config must be a ConfigDict or dict, got {type(cfg).__name__}")
