"""DiffAugment (Zhao et al. 2020) as used by DetailFlow's discriminator (official
``utils/diff_aug.py``), in pure JAX.

``diff_augment(key, x, "color,translation,cutout_0.2", p=0.5)`` applies each comma-separated policy
group with probability ``p``, decided once per call for the whole batch; the group's random
parameters are drawn per sample:

* ``color``: brightness + U(-0.5, 0.5), then saturation x U(0, 2) around the channel mean, then
  contrast x U(0.5, 1.5) around the image mean;
* ``translation[_r]``: shift by an integer in [-round(r*size), round(r*size)] per axis (default r =
  1/8), zero fill;
* ``cutout[_r]``: zero a square of side round(r*size) (default r = 0.5) whose centre is uniform over
  the image (clipped at the borders).

Images are NHWC. Shapes are static and every decision is a traced value, so it jits once per image
size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_DEFAULT_RATIO = {"translation": 0.125, "cutout": 0.5}


def parse_policy(policy: str) -> list[tuple[str, float | None]]:
    """"color,translation,cutout_0.2" -> [("color", None), ("translation", 0.125), ("cutout",
    0.2)]."""
    groups = []
    for part in filter(None, (p.strip() for p in policy.split(","))):
        name, _, ratio = part.partition("_")
        if name == "color" and not ratio:
            groups.append((name, None))
        elif name in _DEFAULT_RATIO:
            try:
                groups.append((name, float(ratio) if ratio else _DEFAULT_RATIO[name]))
            except ValueError:
                raise ValueError(
                    f"DiffAugment policy {part!r}: ratio {ratio!r} is not a number"
                ) from None
        else:
            raise ValueError(
                f"unknown DiffAugment policy {part!r} in {policy!r}; use color, translation[_r], "
                "cutout[_r] separated by commas"
            )
    return groups


def _uniform(key, b, lo, hi, dtype):
    return jax.random.uniform(key, (b, 1, 1, 1), dtype, lo, hi)


def color(key: jax.Array, x: jax.Array) -> jax.Array:
    kb, ks, kc = jax.random.split(key, 3)
    b = x.shape[0]
    x = x + _uniform(kb, b, -0.5, 0.5, x.dtype)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    x = (x - mean) * _uniform(ks, b, 0.0, 2.0, x.dtype) + mean
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - mean) * _uniform(kc, b, 0.5, 1.5, x.dtype) + mean


def _side(size: int, ratio: float) -> int:
    return int(size * ratio + 0.5)  # the reference's rounding


def _shift_axis(x: jax.Array, shift: jax.Array, axis: int) -> jax.Array:
    """out[b, i] = x[b, i + shift[b]] along ``axis`` (1 or 2), zero where the source is outside the
    image."""
    size = x.shape[axis]
    src = jnp.arange(size)[None, :] + shift[:, None]  # (B, size)
    valid = (src >= 0) & (src < size)
    shape = (x.shape[0], size, 1, 1) if axis == 1 else (x.shape[0], 1, size, 1)
    gathered = jnp.take_along_axis(x, jnp.clip(src, 0, size - 1).reshape(shape), axis=axis)
    return jnp.where(valid.reshape(shape), gathered, jnp.zeros((), x.dtype))


def translation(key: jax.Array, x: jax.Array, ratio: float = 0.125) -> jax.Array:
    b, h, w, _ = x.shape
    kh, kw = jax.random.split(key)
    sh, sw = _side(h, ratio), _side(w, ratio)
    x = _shift_axis(x, jax.random.randint(kh, (b,), -sh, sh + 1), axis=1)
    return _shift_axis(x, jax.random.randint(kw, (b,), -sw, sw + 1), axis=2)


def cutout(key: jax.Array, x: jax.Array, ratio: float = 0.5) -> jax.Array:
    b, h, w, _ = x.shape
    kh, kw = jax.random.split(key)
    ch, cw = _side(h, ratio), _side(w, ratio)
    # Centre offsets as in the reference: randint(0, size + 1 - side % 2); the square starts side //
    # 2 before it.
    top = jax.random.randint(kh, (b, 1), 0, h + 1 - ch % 2) - ch // 2
    left = jax.random.randint(kw, (b, 1), 0, w + 1 - cw % 2) - cw // 2
    rows = jnp.arange(h)[None, :]
    cols = jnp.arange(w)[None, :]
    in_rows = (rows >= top) & (rows < top + ch)  # (B, H)
    in_cols = (cols >= left) & (cols < left + cw)  # (B, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[..., None].astype(x.dtype)


_GEOMETRIC = {"translation": translation, "cutout": cutout}


def diff_augment(key: jax.Array, x: jax.Array, policy: str = "color,translation,cutout_0.2",
                 p: float = 0.5) -> jax.Array:
    """Augments the NHWC batch ``x``.

    ``p`` (a Python float, static) is the per-call probability of each policy group; p = 0 returns
    ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"DiffAugment expects NHWC images, got shape {x.shape}")
    groups = parse_policy(policy)
    if p <= 0:
        return x
    for name, ratio in groups:
        key, k_apply, k_params = jax.random.split(key, 3)
        augmented = color(k_params, x) if name == "color" else _GEOMETRIC[name](k_params, x, ratio)
        x = augmented if p >= 1 else jnp.where(jax.random.uniform(k_apply) < p, augmented, x)
    return x
