"""DINO discriminator (official, from VAR / Infinity: ``DinoDisc``): trainable heads on a frozen
DINO ViT-S/16.

One head per backbone read-out (5 of them), each on (B, L=196, C=384) tokens:

    SNConv1d(C, C, k=1) -> BN -> LReLU(0.2)
    (x + [SNConv1d(C, C, k=9, circular pad 4) -> BN -> LReLU(0.2)](x)) / sqrt(2)
    SNConv1d(C, 1, k=1)

giving logits (B, 5·L = 980). The frozen backbone's parameters are a call *argument*, not variables
of this module, so the optimiser only ever sees the heads; gradients still flow through the backbone
to the images.

Variables: ``params`` (head weights) and ``batch_stats`` (BatchNorm running statistics and the
spectral-norm u, v vectors). ``train=True`` uses batch statistics and runs one power iteration, both
of which update ``batch_stats`` (apply with ``mutable=["batch_stats"]``); ``train=False`` uses the
running statistics and the stored u, v (PyTorch eval semantics). Under ``jit`` with a globally
sharded batch the BatchNorm reduction is already over the global batch (what SyncBatchNorm does), so
no ``axis_name`` is needed. Running variances are updated with the biased batch variance (Flax)
where PyTorch uses the unbiased one: a factor n/(n-1) with n = B·196, immaterial.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax.losses.dino import X_SCALE, X_SHIFT, DinoViT, dino_preprocess
from detailflow_jax.losses.weights import load_required_params

WEIGHTS_FLAG = "--config.losses.dino_weights"
CONVERTER = "detailflow_jax.convert.dino"
_REPLICATED3 = (None, None, None)


def _l2_normalize(v: jax.Array, eps: float) -> jax.Array:
    """torch ``F.normalize``: v / max(||v||, eps)."""
    return v / jnp.maximum(jnp.linalg.norm(v), eps)


def _unit_normal(key, shape, dtype=jnp.float32):
    return _l2_normalize(jax.random.normal(key, shape, dtype), 1e-12)


def _torch_bias_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


class SNConv1d(nn.Module):
    """Conv1d over (B, L, C_in) with circular padding k//2 and a spectrally normalised kernel.

    As ``torch.nn.utils.spectral_norm(dim=0, eps=1e-12)``: sigma = u^T W v with W the kernel as
    (out, in·k) and u, v persistent; train mode first runs one power iteration (v <- norm(W^T u), u
    <- norm(W v)) and stores u, v.
    """

    features: int
    kernel_size: int = 1
    eps: float = 1e-12
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        k, c_in = self.kernel_size, x.shape[-1]
        fan_in = k * c_in
        kernel = self.param("kernel", nn.with_logical_partitioning(
            # torch Conv1d default
            nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), _REPLICATED3),
            (k, c_in, self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(_torch_bias_init(fan_in), (None,)),
                          (self.features,), self.param_dtype)
        u = self.variable(
            "batch_stats",
            "u",
            _unit_normal,
            self.make_rng("params") if self.is_initializing() else None,
            (self.features,),
        )
        v = self.variable(
            "batch_stats",
            "v",
            _unit_normal,
            self.make_rng("params") if self.is_initializing() else None,
            (fan_in,),
        )
        w_mat = jnp.transpose(kernel, (2, 1, 0)).reshape(self.features, fan_in).astype(jnp.float32)
        u_vec, v_vec = u.value, v.value
        if train:
            v_vec = jax.lax.stop_gradient(_l2_normalize(w_mat.T @ u_vec, self.eps))
            u_vec = jax.lax.stop_gradient(_l2_normalize(w_mat @ v_vec, self.eps))
            if not self.is_initializing():
                u.value, v.value = u_vec, v_vec
        sigma = u_vec @ (w_mat @ v_vec)
        w = (kernel.astype(jnp.float32) / sigma).astype(self.dtype)
        pad = k // 2
        h = (
            jnp.pad(x.astype(self.dtype), ((0, 0), (pad, pad), (0, 0)), mode="wrap")
            if pad
            else x.astype(self.dtype)
        )
        y = jax.lax.conv_general_dilated(
            h, w, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
        )
        return y + bias.astype(self.dtype)


class DiscHead(nn.Module):
    """SN-conv block, residual SN-conv block, SN-conv to one logit per token: (B, L, C) -> (B,
    L)."""

    kernel_size: int = 9
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _block(self, x, train, kernel_size, name, mask):
        h = SNConv1d(
            x.shape[-1],
            kernel_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=f"{name}_conv",
        )(x, train)
        h = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=self.norm_eps,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            use_fast_variance=False,
            name=f"{name}_norm",
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
        )(h, mask=mask)
        return nn.leaky_relu(h, 0.2)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool,
                 sample_mask: jax.Array | None = None) -> jax.Array:
        mask = None if sample_mask is None else sample_mask[:, None, None]
        h = self._block(x.astype(jnp.float32), train, 1, "block", mask)
        h = (h + self._block(h, train, self.kernel_size, "residual", mask)) * (1 / np.sqrt(2))
        out = SNConv1d(1, 1, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(h, train)
        return out[..., 0].astype(jnp.float32)


class DinoDiscriminator(nn.Module):
    """``D.apply(vars, x, backbone_params, train, crop_key)`` -> (B, (1 + len(key_depths))·L)
    float32 logits.

    x: NHWC images in [-1, 1] of any size (resized / cropped to ``img_size`` by ``dino_preprocess``;
    pass ``crop_key`` to allow the random crop of larger images). ``backbone_params``: the frozen
    ``DinoViT`` parameters (from ``load_dino_params``). ``sample_mask`` (B,) bool: only those
    samples enter the train-mode BatchNorm statistics (the others are still scored), as if the batch
    held them alone.
    """

    width: int = 384
    heads: int = 6
    patch: int = 16
    img_size: int = 224
    key_depths: Sequence[int] = (2, 5, 8, 11)
    kernel_size: int = 9
    norm_eps: float = 1e-6
    crop_prob: float = 0.5
    x_scale: Sequence[float] = X_SCALE
    x_shift: Sequence[float] = X_SHIFT
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def backbone(self) -> DinoViT:
        # parent=None: an unbound module applied with the given (frozen) parameters, not a child of
        # this one.
        return DinoViT(width=self.width, heads=self.heads, patch=self.patch, img_size=self.img_size,
                       key_depths=tuple(self.key_depths), ln_eps=self.norm_eps, dtype=self.dtype,
                       param_dtype=self.param_dtype, parent=None)

    @nn.compact
    def __call__(self, x: jax.Array, backbone_params: Any, train: bool,
                 crop_key: jax.Array | None = None,
                 sample_mask: jax.Array | None = None) -> jax.Array:
        images = dino_preprocess(
            x, self.img_size, crop_key, self.crop_prob, self.x_scale, self.x_shift
        )
        acts = self.backbone().apply({"params": backbone_params}, images)
        heads = [DiscHead(self.kernel_size, self.norm_eps, self.dtype, self.param_dtype,
                          name=f"head_{i}") for i in range(len(acts))]
        logits = [head(a, train, sample_mask) for head, a in zip(heads, acts)]
        return jnp.concatenate(logits, axis=1)


def load_dino_params(path) -> tuple[Any, dict | None]:
    """(frozen backbone params, head variables or None) from a ``convert.dino`` directory, or a
    clear error."""
    tree = load_required_params("DINO discriminator", path, WEIGHTS_FLAG, CONVERTER)
    return tree["backbone"], tree.get("heads")
