"""Starts the tokenizer encoder from a pretrained SigLIP2 vision tower (official
``encoder_pretrained: True``: ``Siglip2VisionModel`` so400m-patch16-naflex cut to its first 12
layers; docs/fidelity.md#tokenizer-model).

    --config.encoder_pretrained=True --config.encoder_weights=S   # S: python -m ...convert.siglip2

The encoder is the HF vision transformer with the Flax names and layouts of ``SiglipVisionTower``
(one key map converts both, ``convert.siglip2.tower_key_map``; both use ``patchify``,
``resized_position_table`` and ``ViTStack``), so the copy is one-to-one: ``patch_embedding`` (Linear
on (row, col, channel) patches), ``position_embedding`` (the G×G table, resized bilinearly with
antialias by both), ``post_layernorm``, and the tower's first ``encoder.depth`` layers as
``layers/layers_i``. The latent queries (``latent_tokens``, ``refined_tokens``,
``latent_pos_embed``) have no SigLIP2 counterpart and keep their random initialisation, as in the
official ``SiglipEncoder``. The trainer calls this only when it starts from step 0: a checkpoint
wins.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from detailflow_jax.config_lib import ConfigError
from detailflow_jax.losses.alignment import CONVERTER, load_siglip_tower
from detailflow_jax.losses.weights import require_weights
from detailflow_jax.tokenizer.config import TokenizerConfig

WEIGHTS_FLAG = "--config.encoder_weights"
SWITCH_FLAG = "--config.encoder_pretrained"
WHAT = "tokenizer encoder initialisation (pretrained SigLIP2)"
# Copied besides the first encoder.depth layers.
_SHARED = ("patch_embedding", "position_embedding", "post_layernorm")


class EncoderWeightsMismatch(ValueError):
    """The SigLIP2 tower given for the encoder does not have the encoder's sizes."""


def encoder_weights(config: ml_collections.ConfigDict) -> str | None:
    """The tower directory to start the encoder from (absolute), or None for a random start.

    ``encoder_pretrained`` without ``encoder_weights`` is a MissingWeightsError naming the flag
    (the official ImageNet recipe sets the switch, as it sets the losses that need weights)."""
    pretrained = config.get("encoder_pretrained", False)
    path = config.get("encoder_weights", "")
    if path and not pretrained:
        raise ConfigError(f"encoder_weights={path!r} is set but encoder_pretrained=False: pass "
                          f"{SWITCH_FLAG}=True to start the encoder from it, or drop "
                          f"{WEIGHTS_FLAG}")
    return require_weights(WHAT, path, WEIGHTS_FLAG, CONVERTER) if pretrained else None


def _copied(tower_params: Mapping, depth: int) -> dict[tuple[str, ...], Any]:
    """The tower entries the encoder takes, flat ({path: array}), in the encoder's paths."""
    subset = {key: tower_params[key] for key in _SHARED}
    subset["layers"] = {f"layers_{i}": tower_params["layers"][f"layers_{i}"] for i in range(depth)}
    return traverse_util.flatten_dict(subset)


def _mismatches(tower, tower_params: Mapping, encoder_flat: Mapping,
                cfg: TokenizerConfig) -> list[str]:
    vit = cfg.encoder
    if tower.heads != vit.heads:
        return [f"heads: {tower.heads} in the tower vs model.encoder.heads={vit.heads}"]
    if tower.depth < vit.depth:
        return [f"layers: the tower has {tower.depth}, model.encoder.depth={vit.depth} needs more"]
    if tower.ln_eps != cfg.ln_eps:
        return [f"LayerNorm eps: {tower.ln_eps} in SigLIP2 vs model.ln_eps={cfg.ln_eps}"]
    problems = []
    for path, value in _copied(tower_params, vit.depth).items():
        target = encoder_flat.get(path)
        shape = None if target is None else tuple(target.shape)
        if tuple(value.shape) != shape:
            problems.append(f"{'/'.join(path)}: tower {tuple(value.shape)} vs encoder {shape}")
    return problems


def with_pretrained_encoder(params: dict, shardings: Any, path: str, cfg: TokenizerConfig) -> dict:
    """``params`` (the tokenizer's) with the encoder's SigLIP2 parts taken from the tower at
    ``path``, placed on ``shardings`` (the params' shardings) in the params' dtypes; the rest as is.

    A tower of other sizes is an EncoderWeightsMismatch naming the flag and the mismatches."""
    tower, tower_params = load_siglip_tower(path, name=WHAT, flag=WEIGHTS_FLAG)
    flat = traverse_util.flatten_dict(params["encoder"])
    problems = _mismatches(tower, tower_params, flat, cfg)
    if problems:
        v = cfg.encoder
        raise EncoderWeightsMismatch(
            f"{WEIGHTS_FLAG}={path} does not fit the encoder (width={v.width}, depth={v.depth}, "
            f"heads={v.heads}, mlp_dim={v.mlp_dim}, patch_size={cfg.patch_size}, "
            f"pos_grid={cfg.pos_grid}): {'; '.join(problems[:3])}; convert a matching tower or "
            f"pass {SWITCH_FLAG}=False")
    flat_shardings = traverse_util.flatten_dict(shardings["encoder"])
    for key, value in _copied(tower_params, cfg.encoder.depth).items():
        host = np.asarray(jax.device_get(value)).astype(flat[key].dtype)
        flat[key] = jax.device_put(host, flat_shardings[key])
    return dict(params, encoder=traverse_util.unflatten_dict(flat))
