"""The FID Inception-v3 ("inception-2015-12-05", 1008 classes) in Flax Linen, and a jitted feature
extractor.

The network is pytorch-fid's ``fid_inception_v3()``: torchvision's Inception3 with the blocks that
differ from the TensorFlow graph replaced (``FIDInceptionA/C/E_1`` average-pool without counting the
padding, ``FIDInceptionE_2`` max-pools), BatchNorm eps 1e-3 in inference mode. Parameter names
mirror the PyTorch state dict (``Mixed_5b/ branch1x1/conv/kernel`` <-
``Mixed_5b.branch1x1.conv.weight``), so ``convert/inception.py`` is a direct mapping.

Outputs, as used by the ADM evaluator (``guided-diffusion/evaluations/evaluator.py``):
  * ``pool``: the 2048-d ``pool_3`` features (FID, precision/recall);
  * ``spatial``: ``mixed_6/conv:0`` (= ``Mixed_6d.branch1x1`` after BN+ReLU, the first 192 channels
    of the Mixed_6d output), first 7 channels, flattened in (H, W, C) order: 17 * 17 * 7 = 2023 dims
    (sFID);
  * ``logits``: ``fc(pool)`` with bias (pytorch-fid / torchvision convention);
  * ``logits_unbiased``: ``pool @ fc.kernel`` without bias, which is what the ADM evaluator (and the
    original improved-GAN Inception Score) feeds to the softmax for the Inception Score.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from detailflow_jax.sharding import BATCH_AXES, batch_sharding, replicated

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
BN_EPS = 1e-3

# "pytorch_fid": x/255, half-pixel bilinear resize (torch F.interpolate, align_corners=False), 2x-1
# (parity-tested). "adm": the TF graph used by the ADM evaluator: legacy TF1 bilinear resize
# (align_corners=False,
#        half_pixel_centers=False) on [0, 255] values, then (x - 128) / 128 (as torch-fidelity
#        reproduces it).
Preprocess = Literal["pytorch_fid", "adm"]
PREPROCESS_MODES = ("pytorch_fid", "adm")


# Every parameter is replicated (logical names all None): the network is small (24M parameters) and
# is evaluated on a data-sharded batch, so sharding its weights would only add collectives.


class FrozenBatchNorm(nn.Module):
    """BatchNorm in inference mode with the running statistics stored as parameters (the network is
    never trained)."""

    @nn.compact
    def __call__(self, x):
        n = x.shape[-1]
        names = (None,)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, names), (n,), jnp.float32
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, names), (n,), jnp.float32
        )
        mean = self.param(
            "mean", nn.with_logical_partitioning(nn.initializers.zeros, names), (n,), jnp.float32
        )
        var = self.param(
            "var", nn.with_logical_partitioning(nn.initializers.ones, names), (n,), jnp.float32
        )
        # Same folding as PyTorch's eval-mode batch_norm: x * (g / sqrt(v + eps)) + (b - m * g /
        # sqrt(v + eps)).
        alpha = scale * jax.lax.rsqrt(var + BN_EPS)
        return x.astype(jnp.float32) * alpha + (bias - mean * alpha)


class ConvBN(nn.Module):
    """pytorch-fid's BasicConv2d: conv (no bias) -> BatchNorm -> ReLU."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        y = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None,) * 4),
            name="conv",
        )(x)
        return nn.relu(FrozenBatchNorm(name="bn")(y)).astype(self.dtype)


def _avg_pool_3x3_same(x):
    # TensorFlow's SAME average pool divides by the number of real (non-padded) pixels.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int, pad: int = 0):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    """FIDInceptionA (Mixed_5b/5c/5d)."""

    pool_features: int
    conv: Any

    @nn.compact
    def __call__(self, x):
        c = self.conv
        b1 = c(64, (1, 1), name="branch1x1")(x)
        b5 = c(48, (1, 1), name="branch5x5_1")(x)
        b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = c(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """InceptionB (Mixed_6a): grid reduction 35 -> 17."""

    conv: Any

    @nn.compact
    def __call__(self, x):
        c = self.conv
        b3 = c(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = c(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = c(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC (Mixed_6b..6e) with factorised 7x7 convolutions."""

    channels_7x7: int
    conv: Any

    @nn.compact
    def __call__(self, x):
        c, c7 = self.conv, self.channels_7x7
        b1 = c(192, (1, 1), name="branch1x1")(x)
        b7 = c(c7, (1, 1), name="branch7x7_1")(x)
        b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = c(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = c(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """InceptionD (Mixed_7a): grid reduction 17 -> 8."""

    conv: Any

    @nn.compact
    def __call__(self, x):
        c = self.conv
        b3 = c(192, (1, 1), name="branch3x3_1")(x)
        b3 = c(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = c(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (Mixed_7b, average pool) and FIDInceptionE_2 (Mixed_7c, max pool)."""

    max_pool: bool
    conv: Any

    @nn.compact
    def __call__(self, x):
        c = self.conv
        b1 = c(320, (1, 1), name="branch1x1")(x)
        b3 = c(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = c(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool_3x3(x, 1, pad=1) if self.max_pool else _avg_pool_3x3_same(x)
        bp = c(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
    """The 1008-way ``fc`` layer; returns (pool @ W, pool @ W + b) because IS (ADM) uses the
    former."""

    @nn.compact
    def __call__(self, pool):
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None)),
            (pool.shape[-1], NUM_CLASSES),
            jnp.float32,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
            (NUM_CLASSES,),
            jnp.float32,
        )
        unbiased = jnp.dot(pool, kernel, precision=jax.lax.Precision.HIGHEST)
        return unbiased, unbiased + bias


class InceptionV3(nn.Module):
    """FID Inception-v3 on preprocessed images ``(B, 299, 299, 3)`` in [-1, 1]; see ``preprocess``.

    ``dtype`` is the conv compute dtype (bf16 for speed; fp32 for parity); BatchNorm, pooling of the
    final features and the classifier run in fp32. ``precision`` defaults to HIGHEST so fp32 means
    fp32 on TPU too.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(
            ConvBN, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision
        )
        x = x.astype(self.dtype)
        x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = InceptionA(32, conv, name="Mixed_5b")(x)
        x = InceptionA(64, conv, name="Mixed_5c")(x)
        x = InceptionA(64, conv, name="Mixed_5d")(x)
        x = InceptionB(conv, name="Mixed_6a")(x)
        x = InceptionC(128, conv, name="Mixed_6b")(x)
        x = InceptionC(160, conv, name="Mixed_6c")(x)
        x = InceptionC(160, conv, name="Mixed_6d")(x)
        # Mixed_6d's first 192 channels are its branch1x1 output, i.e. TF's mixed_6/conv:0.
        spatial = x[..., :SPATIAL_CHANNELS].astype(jnp.float32).reshape(x.shape[0], -1)
        x = InceptionC(192, conv, name="Mixed_6e")(x)
        x = InceptionD(conv, name="Mixed_7a")(x)
        x = InceptionE(False, conv, name="Mixed_7b")(x)
        x = InceptionE(True, conv, name="Mixed_7c")(x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits_unbiased, logits = Classifier(name="fc")(pool)
        return {
            "pool": pool,
            "spatial": spatial,
            "logits": logits,
            "logits_unbiased": logits_unbiased,
        }


def _bilinear_matrix(in_size: int, out_size: int, half_pixel: bool) -> np.ndarray:
    """(out, in) interpolation weights of a 1-D bilinear resize without antialiasing.

    half_pixel=True is PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``: src = (dst
    + 0.5) * s - 0.5, clamped at 0. half_pixel=False is TF1's legacy ``resize_bilinear``
    (align_corners=False): src = dst * s. Both clamp the upper neighbour to the last pixel.
    """
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0) if half_pixel else dst * scale
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), hi), frac)
    return weights.astype(np.float32)


def resize_bilinear(x: jax.Array, size: int, half_pixel: bool = True) -> jax.Array:
    """Separable bilinear resize of ``(B, H, W, C)`` float images to ``size x size`` (two small
    matmuls)."""
    _, h, w, _ = x.shape
    rows = jnp.asarray(_bilinear_matrix(h, size, half_pixel))
    cols = jnp.asarray(_bilinear_matrix(w, size, half_pixel))
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=hp)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=hp)


def preprocess(images: jax.Array, mode: Preprocess = "pytorch_fid") -> jax.Array:
    """uint8 ``(B, H, W, 3)`` images -> float32 ``(B, 299, 299, 3)`` network input in [-1, 1]."""
    x = images.astype(jnp.float32)
    if mode == "pytorch_fid":
        return 2.0 * resize_bilinear(x / 255.0, INPUT_SIZE, half_pixel=True) - 1.0
    if mode == "adm":
        return (resize_bilinear(x, INPUT_SIZE, half_pixel=False) - 128.0) / 128.0
    raise ValueError(f"unknown preprocess mode {mode!r}; use one of {PREPROCESS_MODES}")


def abstract_params(model: InceptionV3 | None = None) -> Any:
    """Boxed ShapeDtypeStructs of the parameters (for ``assign_to_tree`` and ``init_sharded``)."""
    model = model or InceptionV3()
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


@functools.lru_cache(maxsize=None)
def _extract_fn(dtype, mode: str):
    """One jitted function per configuration, shared by all extractors (so a new extractor does not
    recompile)."""
    model = InceptionV3(dtype=dtype)
    return jax.jit(lambda params, images: model.apply({"params": params}, preprocess(images, mode)))


class InceptionFeatures:
    """Jitted feature extractor: uint8 ``(B, H, W, 3)`` images -> dict(pool, spatial, logits,
    logits_unbiased).

    With a ``mesh`` the parameters are replicated on it and each batch is sharded over the mesh's
    data axes (``BATCH_AXES``); a batch whose size the data axes do not divide is zero-padded and
    the padding dropped from the outputs. Keep the batch size fixed across calls (pad the last
    batch) so the function compiles once.
    """

    def __init__(
        self,
        params: Any,
        *,
        mesh: Mesh | None = None,
        preprocess: Preprocess = "pytorch_fid",
        dtype: Any = jnp.float32,
    ):
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(
                f"unknown preprocess mode {preprocess!r}; use one of {PREPROCESS_MODES}"
            )
        self.mesh = mesh
        params = nn.unbox(params)
        self.params = jax.device_put(params, replicated(mesh)) if mesh is not None else params
        self._fn = _extract_fn(jnp.dtype(dtype), preprocess)

    @property
    def data_parallelism(self) -> int:
        return 1 if self.mesh is None else int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))

    def __call__(self, images) -> dict[str, jax.Array]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected images of shape (B, H, W, 3) (NHWC, RGB), got {tuple(images.shape)}"
            )
        if images.dtype != jnp.uint8:
            raise ValueError(
                f"expected uint8 images in [0, 255], got dtype {images.dtype}; convert float "
                "images in "
                "[0, 1] with np.clip(np.round(x * 255), 0, 255).astype(np.uint8) first"
            )
        n = images.shape[0]
        pad = -n % self.data_parallelism
        if pad:
            images = jnp.concatenate(
                [jnp.asarray(images), jnp.zeros((pad, *images.shape[1:]), jnp.uint8)]
            )
        if self.mesh is not None:
            images = jax.device_put(images, batch_sharding(self.mesh, 4))
        out = self._fn(self.params, images)
        return {k: v[:n] for k, v in out.items()} if pad else out
