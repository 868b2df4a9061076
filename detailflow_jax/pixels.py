"""Float images in [-1, 1] -> uint8 pixels, as the official samplers and reconstruction scripts
convert them.

The official code computes ``clamp(127.5 * x + 128, 0, 255).to(uint8)``. Under its default bf16
autocast the decoder's output is bfloat16, so the product and the sum are each rounded to bfloat16
before the cast truncates; for values above 128 (spacing 1) that is rounding to the nearest level,
below it a rounding to the nearest half or quarter level followed by truncation.
``arithmetic="float32"`` is the same formula in float32, which the official code applies to its
float32 inputs (the real images of the reconstruction evaluation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ARITHMETICS = ("bfloat16", "float32")


def round_to_bfloat16(x: jax.Array) -> jax.Array:
    """float32 -> the nearest bfloat16 value (ties to even), kept in float32. Integer operations, so
    that XLA's excess-precision rewrites cannot drop the rounding as they may drop a convert
    pair."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    bits = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def to_uint8(images, arithmetic: str = "bfloat16") -> jax.Array:
    """(...) float images in [-1, 1] -> uint8 of the same shape, in the official arithmetic (module
    docstring)."""
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic={arithmetic!r}: must be one of {ARITHMETICS}")
    x = jnp.asarray(images, jnp.float32)
    if arithmetic == "bfloat16":
        x = round_to_bfloat16(x)
        x = round_to_bfloat16(round_to_bfloat16(127.5 * x) + 128.0)
    else:
        x = 127.5 * x + 128.0
    # float -> uint8 truncates, as torch's .to(uint8)
    return jnp.clip(x, 0.0, 255.0).astype(jnp.uint8)
