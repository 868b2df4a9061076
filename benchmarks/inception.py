"""Throughput of the FID Inception feature extractor (uint8 images -> pool/spatial/logits), on the default backend.

    python benchmarks/inception.py --batch 16 --image-size 256 --dtype float32,bfloat16

Weights are random (speed does not depend on them). Prints a table and one JSON line. Compile time is reported
separately from the steady-state images/s.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax.nn.inception import INPUT_SIZE, InceptionFeatures, InceptionV3


def measure(params, batch: int, image_size: int, dtype: str, iters: int) -> dict:
    extractor = InceptionFeatures(params, dtype=jnp.dtype(dtype))
    images = np.random.default_rng(0).integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    start = time.perf_counter()
    jax.block_until_ready(extractor(images))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(extractor(images))
    step_s = (time.perf_counter() - start) / iters
    return dict(batch=batch, image_size=image_size, dtype=dtype, compile_s=round(compile_s, 2),
                step_ms=round(step_s * 1e3, 1), images_per_s=round(batch / step_s, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--dtype", default="float32", help="comma-separated conv compute dtypes")
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()

    params = jax.jit(InceptionV3().init)(jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))["params"]
    rows = [measure(params, args.batch, args.image_size, d, args.iters) for d in args.dtype.split(",")]
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind}")
    print(f"{'dtype':>9} {'batch':>5} {'size':>5} {'compile s':>9} {'step ms':>8} {'img/s':>7}")
    for r in rows:
        print(f"{r['dtype']:>9} {r['batch']:>5} {r['image_size']:>5} {r['compile_s']:>9} {r['step_ms']:>8} "
              f"{r['images_per_s']:>7}")
    print(json.dumps({"benchmark": "inception_features", "backend": jax.default_backend(), "results": rows}))


if __name__ == "__main__":
    main()
