"""Throughput of the FID Inception feature extractor (uint8 images -> pool/spatial/logits), on the
default backend.

    python benchmarks/inception.py --batch 16 --image_size 256 --dtype float32,bfloat16

Weights are random (speed does not depend on them). Prints a table and one JSON line. Compile time
is reported separately from the steady-state images/s.
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detailflow_jax import cli, cli_errors  # noqa: E402
from detailflow_jax.nn.inception import INPUT_SIZE, InceptionFeatures, InceptionV3  # noqa: E402


def measure(params, batch: int, image_size: int, dtype: str, iters: int) -> dict:
    extractor = InceptionFeatures(params, dtype=jnp.dtype(dtype))
    images = np.random.default_rng(0).integers(
        0, 256, (batch, image_size, image_size, 3), dtype=np.uint8
    )
    start = time.perf_counter()
    jax.block_until_ready(extractor(images))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(extractor(images))
    step_s = (time.perf_counter() - start) / iters
    return dict(batch=batch, image_size=image_size, dtype=dtype, compile_s=round(compile_s, 2),
                step_ms=round(step_s * 1e3, 1), images_per_s=round(batch / step_s, 1))


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("batch", 16, "images per call", flag_values=fv)
    flags.DEFINE_integer("image_size", 256, "input side in pixels (resized to 299 inside; "
                         "--image-size also works)", flag_values=fv)
    flags.DEFINE_list("dtype", ["float32"], "comma-separated conv compute dtypes", flag_values=fv)
    flags.DEFINE_integer("iters", 3, "timed steady calls per dtype", flag_values=fv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = cli.parse(argv, __doc__, _define_flags, {"image-size": "image_size"})

    params = jax.jit(InceptionV3().init)(
        jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
    )["params"]
    rows = [measure(params, args.batch, args.image_size, d, args.iters) for d in args.dtype]
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind}")
    print(f"{'dtype':>9} {'batch':>5} {'size':>5} {'compile s':>9} {'step ms':>8} {'img/s':>7}")
    for r in rows:
        print(
            f"{r['dtype']:>9} {r['batch']:>5} {r['image_size']:>5} {r['compile_s']:>9} "
            f"{r['step_ms']:>8} "
            f"{r['images_per_s']:>7}"
        )
    print(
        json.dumps(
            {"benchmark": "inception_features", "backend": jax.default_backend(), "results": rows}
        )
    )
    return rows


if __name__ == "__main__":
    cli_errors.run(main)
