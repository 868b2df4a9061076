"""Measured peaks of the current device: matmul FLOP/s (the denominator for model-FLOPs utilisation)
and memory read bandwidth (the denominator for memory-bound work such as small-batch sampling, which
streams every weight at every step).

    python benchmarks/peaks.py [--dtype bf16|fp32] [--size N]
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detailflow_jax import cli, cli_errors  # noqa: E402

DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


def measure_peak_flops(dtype=jnp.float32, size: int | None = None, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a square (size x size) @ (size x size) matmul chain on the
    default device.

    The default size is 8192 on accelerators and 2048 on CPU (large enough to be compute bound,
    small enough to finish in about a second).
    """
    if size is None:
        size = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    chain = 4  # several matmuls per call amortise the dispatch overhead

    @jax.jit
    def run(a, b):
        for _ in range(chain):
            a = (a @ b) * jnp.asarray(1.0 / size, dtype)  # rescale so values stay finite
        return a

    run(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return chain * 2 * size ** 3 / best


def measure_peak_bandwidth(num_bytes: int | None = None, repeats: int = 5) -> float:
    """Best-of-`repeats` bytes/s of reading a float32 array once (a jitted sum) on the default
    device.

    The default array is 512 MiB on CPU (far beyond the caches) and 4 GiB on accelerators.
    """
    if num_bytes is None:
        num_bytes = (512 if jax.default_backend() == "cpu" else 4096) * 2 ** 20
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    run = jax.jit(jnp.sum)
    run(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return x.size * 4 / best


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("dtype", "fp32", sorted(DTYPES), "matmul dtype", flag_values=fv)
    flags.DEFINE_integer("size", None, "side of the square matmul (default: by the device)",
                         flag_values=fv)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(argv, __doc__, _define_flags)
    flops = measure_peak_flops(DTYPES[args.dtype], args.size)
    bandwidth = measure_peak_bandwidth()
    print(f"{jax.devices()[0].device_kind}: {flops / 1e12:.3f} TFLOP/s ({args.dtype} matmul), "
          f"{bandwidth / 1e9:.1f} GB/s (memory read)")


if __name__ == "__main__":
    cli_errors.run(main)
