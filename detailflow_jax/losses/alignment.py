"""Alignment loss of token 1 against a frozen SigLIP2 (official ``global_token_learning``;
docs/fidelity.md#losses).

    tower, tower_params = load_siglip_tower(path)                     # a convert.siglip2 directory
    target = siglip_target(tower, tower_params, clean_images)         # (B, 1152), unit norm, no gradient
    loss = alignment_loss(proj_params, quant[:B, 0], target)          # mean over the batch of -cos

* ``SiglipVisionTower``: the HF ``Siglip2VisionModel`` vision transformer of
  ``google/siglip2-so400m-patch16-naflex`` (27 layers, width 1152, 16 heads, MLP 4304, patch 16,
  16x16 position table), as the official ``repa_model``
  (``CustomSiglip2VisionModel.forward_features``) runs it: Linear patch embedding, position table
  resized to the patch grid, full attention, then ``post_layernorm`` applied **twice** (HF's vision
  transformer applies it and ``forward_features`` applies it again), mean over the patch tokens,
  l2-normalised. It reuses the tokenizer encoder's pieces (``patchify``, ``resized_position_table``,
  ``ViTStack``) and parameter names, so the same state-dict key map converts both
  (``convert.siglip2``).
* ``GlobalTokenProjection``: the trainable ``global_token_proj`` MLP 8 -> 1024 -> SiLU -> 1024 ->
  SiLU -> 1152 with torch ``nn.Linear`` default initialisation.
"""  # noqa: E501

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detailflow_jax.losses.weights import MissingWeightsError, load_required_params
from detailflow_jax.nn.patches import patchify, resized_position_table
from detailflow_jax.nn.vit import ViTStack, dense, layer_norm, torch_default_inits

WEIGHTS_FLAG = "--config.losses.siglip_weights"
CONVERTER = "detailflow_jax.convert.siglip2"
PROJ_HIDDEN = 1024  # official build_mlp(codebook_dim, 1024, siglip width)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch ``F.normalize(x, dim=-1)``: x / max(||x||, eps), in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class SiglipVisionTower(nn.Module):
    """images (B, H, W, 3) in [-1, 1] -> pooled, l2-normalised features (B, width) in float32.

    Parameters: ``patch_embedding`` (Dense 3·p·p -> width), ``position_embedding`` (pos_grid²,
    width), ``layers/layers_i`` (ViTBlocks), ``post_layernorm``. Defaults are
    SigLIP2-so400m-patch16-naflex.
    """

    width: int = 1152
    depth: int = 27
    heads: int = 16
    mlp_dim: int = 4304
    patch_size: int = 16
    pos_grid: int = 16
    ln_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, _ = images.shape
        if h != w:
            raise ValueError(
                f"SigLIP2 alignment target: images must be square (B, R, R, 3), got {images.shape}"
            )
        grid = h // self.patch_size
        x = dense(
            self.width,
            ("patch", "embed"),
            "patch_embedding",
            self.dtype,
            self.param_dtype,
            kernel_init=nn.initializers.lecun_normal(),
        )(patchify(images.astype(self.dtype), self.patch_size))
        table = self.param(
            "position_embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(self.width**-0.5), ("length", "embed")
            ),
            (self.pos_grid**2, self.width),
            self.param_dtype,
        )
        x = x.astype(jnp.float32) + resized_position_table(table, grid).astype(jnp.float32)
        x = ViTStack(depth=self.depth, width=self.width, heads=self.heads, mlp_dim=self.mlp_dim,
                     ln_eps=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="layers")(x)
        post_layernorm = layer_norm("post_layernorm", self.ln_eps, self.param_dtype)
        # Official quirk (docs/fidelity.md#losses): HF's vision transformer ends with post_layernorm
        # and the official forward_features applies the same LayerNorm again.
        x = post_layernorm(post_layernorm(x))
        return l2_normalize(jnp.mean(x, axis=1))


def tower_for(params: Any, heads: int, dtype: Any = jnp.float32) -> SiglipVisionTower:
    """A ``SiglipVisionTower`` sized like ``params`` (every size but ``heads`` is read off the
    shapes)."""
    width = params["position_embedding"].shape[-1]
    pos_grid = int(round(params["position_embedding"].shape[0] ** 0.5))
    patch = int(round((params["patch_embedding"]["kernel"].shape[0] / 3) ** 0.5))
    depth = len(params["layers"])
    mlp_dim = params["layers"]["layers_0"]["mlp"]["fc1"]["kernel"].shape[-1]
    if width % heads:
        raise ValueError(f"SigLIP2 tower: heads={heads} does not divide width={width}")
    return SiglipVisionTower(
        width=width,
        depth=depth,
        heads=heads,
        mlp_dim=mlp_dim,
        patch_size=patch,
        pos_grid=pos_grid,
        dtype=dtype,
    )


def load_siglip_tower(path, dtype: Any = jnp.float32, name: str = "alignment loss (frozen SigLIP2)",
                      flag: str = WEIGHTS_FLAG) -> tuple[SiglipVisionTower, Any]:
    """(tower module, frozen params) from a ``convert.siglip2`` directory, or a MissingWeightsError
    naming ``flag`` (what needs the tower, ``name``, and what to pass)."""
    tree = load_required_params(name, path, flag, CONVERTER)
    if not isinstance(tree, dict) or "tower" not in tree or "num_heads" not in tree:
        raise MissingWeightsError(
            f"{flag}={path} is not a directory written by `python -m {CONVERTER}` "
            f"(top-level entries: {sorted(tree) if isinstance(tree, dict) else type(tree)})"
        )
    return tower_for(tree["tower"], int(tree["num_heads"]), dtype), tree["tower"]


def siglip_target(tower: SiglipVisionTower, params: Any, images: jax.Array) -> jax.Array:
    """The frozen tower's pooled features of the clean images: (B, width), unit norm, no
    gradient."""
    return jax.lax.stop_gradient(tower.apply({"params": params}, images))


class GlobalTokenProjection(nn.Module):
    """token 1 (B, 8) -> (B, out_features): Linear -> SiLU -> Linear -> SiLU -> Linear (official
    build_mlp)."""

    out_features: int = 1152
    hidden: int = PROJ_HIDDEN
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = ((self.hidden, ("code_dim", "mlp")), (self.hidden, ("mlp", None)),
                  (self.out_features, (None, "embed")))
        for i, (features, names) in enumerate(layers):
            if i:
                x = nn.silu(x)
            kernel_init, bias_init = torch_default_inits(x.shape[-1])
            x = dense(
                features,
                names,
                f"fc{i + 1}",
                self.dtype,
                self.param_dtype,
                kernel_init=kernel_init,
                bias_init=bias_init,
            )(x)
        return x


def init_projection(rng: jax.Array, code_dim: int, out_features: int) -> dict:
    """Boxed ``global_token_proj`` params (logical names kept for sharded init)."""
    return GlobalTokenProjection(out_features).init(rng, jnp.zeros((1, code_dim), jnp.float32))[
        "params"
    ]


def alignment_loss(proj_params: Any, token1: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over the batch of -cos(global_token_proj(token1), target); ``target`` (B, width) is unit
    norm."""
    pred = GlobalTokenProjection(target.shape[-1]).apply(
        {"params": proj_params}, token1.astype(jnp.float32)
    )
    return -jnp.mean(jnp.sum(l2_normalize(pred) * target.astype(jnp.float32), axis=-1))
