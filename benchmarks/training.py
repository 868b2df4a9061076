"""Where a training step's time goes: the tokenizer and GPT steps of the main job's recipes, timed in one run.

    python benchmarks/training.py [--part tokenizer|gpt|both] [--steps 20] [--repeats 3] \
        [--codes_dir workdir/fashion_mnist/codes] [--tokenizer_config configs/tokenizer_fashion_mnist.py] \
        [--gpt_config configs/ar_fashion_mnist.py]

Random-init models with the recipes' shapes (configs/tokenizer_fashion_mnist.py, configs/ar_fashion_mnist.py, as the
main job runs them); the tokenizer reads the recipe's real data pipeline (Fashion-MNIST), the GPT its extracted codes
when ``--codes_dir`` is given, else random codes of the right shape. Measured, per recipe:

* compile: the first call of every compiled program (one per decoder canvas for the tokenizer), minus a steady call;
* device: the jitted step alone, repeated on one batch already on the device (``block_until_ready`` each call); the
  tokenizer's is averaged over the canvases in the proportions the recipe's own host draws pick them (steps 0 ..
  total_steps - 1, as a real run does);
* host: each piece of host work of an iteration timed on its own (the next batch from the pipeline, the per-step
  draws, placing the batch on the mesh);
* loop: ``--steps`` iterations of the trainer's own step function on the pipeline's batches, compiled already, as the
  training loop runs them (no sync per step; one at the end): steps/s and images/s;
* self-correction: the tokenizer's generator pass (forward + backward) with the doubled 2B decode and the second
  encoder pass, against the same pass on the clean B images alone;
* FLOP/s: analytic model FLOPs (``detailflow_jax.preflight.model_flops``) and XLA's count of the lowered step,
  achieved = FLOPs / device time, against the matmul peak measured in the same run (``benchmarks/peaks.py``).

Prints a table and, last, one JSON object. On a shared machine compare ratios within one run, not absolute times.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.peaks import measure_peak_flops  # noqa: E402
from detailflow_jax import sharding  # noqa: E402
from detailflow_jax.convert.gpt import load_config_file  # noqa: E402
from detailflow_jax.data.global_batch import to_global  # noqa: E402
from detailflow_jax.preflight import model_flops  # noqa: E402
from detailflow_jax.tokenizer.degradation import degrade  # noqa: E402
from detailflow_jax.tokenizer.resolution import ResolutionTables  # noqa: E402


def seconds(fn, repeats: int = 1) -> float:
    """Median wall seconds of ``fn()`` (blocked until its outputs are ready)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def lowered_flops(lowered) -> float | None:
    """XLA's FLOP count of a lowered (not yet optimised) program, or None when the backend gives none."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


class Chain:
    """Calls a state-donating step again and again, feeding each call the state the previous one returned."""

    def __init__(self, fn, state, *args):
        self.fn, self.state, self.args = fn, state, args

    def __call__(self):
        self.state, metrics = self.fn(self.state, *self.args)
        return metrics


def time_loop(step_fn, state, data, first_step: int, steps: int):
    """(seconds per iteration, final state) of ``steps`` loop iterations, dispatched back to back."""
    start = time.perf_counter()
    for step in range(first_step, first_step + steps):
        state, metrics = step_fn(state, next(data), step)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps, state


def host_seconds(fn, repeats: int) -> float:
    """Mean seconds of a host-side call (nothing to block on)."""
    start = time.perf_counter()
    for i in range(repeats):
        fn(i)
    return (time.perf_counter() - start) / repeats


# ---------------------------------------------------------------------------------------------------- tokenizer

def generator_passes(trainer, params, images, t, canvas, matrix, noise_idx, noise_end, key):
    """Jitted forward + backward of the generator's pixel loss two ways: as trained (clean + self-corrected, the
    re-encode included, 2B decoded), and on the clean B images alone (one encode, B decoded)."""
    model = trainer.model
    target = degrade(images, matrix)

    def with_correction(p):
        out = model.apply({"params": p}, images, t, canvas, noise_idx, noise_end, key, True)
        return jnp.mean((out["recon"] - jnp.concatenate([target, target])) ** 2)

    def clean_only(p):
        quant = model.apply({"params": p}, images, method="encode")["quant"]
        recon = model.apply({"params": p}, quant, t, canvas, method="decode")
        return jnp.mean((recon - target) ** 2)

    full, clean = jax.jit(jax.grad(with_correction)), jax.jit(jax.grad(clean_only))
    return (lambda: full(params)), (lambda: clean(params))


def bench_tokenizer(config, steps: int, repeats: int, peak: float) -> dict:
    from detailflow_jax.data.pipeline import make_train_iter
    from detailflow_jax.train.tokenizer import HostDraws, make_step_fn, validate
    from detailflow_jax.train.tokenizer_step import TokenizerStep

    mesh = sharding.make_mesh(validate(config, jax.device_count()))
    trainer = TokenizerStep(config, mesh)
    frozen = trainer.load_frozen()
    state, shardings = trainer.init(config.seed, frozen)
    tables = ResolutionTables.from_model_config(trainer.model_cfg, rounding=config.rounding)
    draws = HostDraws(config, tables)
    recipe_canvases = collections.Counter(draws(s)[1] for s in range(config.total_steps))
    first_step_of = {}
    for s in range(config.total_steps):
        first_step_of.setdefault(draws(s)[1], s)

    data = make_train_iter(config.data, config.batch_size, config.seed)
    host_batch = next(data)
    images = to_global(host_batch["image"], mesh)
    rows = []
    for canvas in sorted(recipe_canvases):
        t, _, matrix, noise_idx, noise_end = draws(first_step_of[canvas])
        fn = trainer.compiled(canvas, shardings, frozen)
        args = (frozen, images, np.int32(t), matrix, noise_idx, noise_end)
        flops_xla = lowered_flops(fn.lower(state, *args))
        chain = Chain(fn, state, *args)
        first = seconds(chain)
        steady = seconds(chain, repeats)
        state = chain.state
        flops = model_flops.tokenizer_step(trainer, canvas, config.batch_size)
        rows.append(dict(canvas=canvas, t=int(t), share=recipe_canvases[canvas] / config.total_steps,
                         compile_s=max(first - steady, 0.0), step_s=steady, model_flops=flops, xla_flops=flops_xla,
                         flops_per_s=flops / steady))
    device_s = sum(r["share"] * r["step_s"] for r in rows)
    model_flops_mean = sum(r["share"] * r["model_flops"] for r in rows)

    host = dict(
        data_s=host_seconds(lambda _: next(data), steps),
        draws_s=host_seconds(lambda i: HostDraws(config, tables)(i), steps),  # fresh: no cached matrices
        to_global_s=host_seconds(lambda _: jax.block_until_ready(to_global(host_batch["image"], mesh)), steps))
    step_fn = make_step_fn(trainer, draws, shardings, frozen)
    # Steps whose canvases are all compiled already (every canvas is above); the recipe's own sequence of draws.
    loop_s, state = time_loop(step_fn, state, data, 0, steps)
    data.close()

    t_full = tables.num_tokens
    _, _, matrix, noise_idx, noise_end = draws(next(s for s in range(config.total_steps) if draws(s)[0] == t_full))
    full, clean = generator_passes(trainer, state["params"], images, t_full, tables.canvas[t_full], matrix,
                                   noise_idx, noise_end, jax.random.key(0))
    seconds(full), seconds(clean)  # compile
    full_s, clean_s = seconds(full, repeats), seconds(clean, repeats)
    batch = config.batch_size
    return dict(
        batch=batch, canvases=rows, num_programs=len(rows), compile_s=sum(r["compile_s"] for r in rows),
        device_step_s=device_s, loop_step_s=loop_s, steps_per_s=1 / loop_s, images_per_s=batch / loop_s,
        host_share=max(loop_s - device_s, 0.0) / loop_s, host=host,
        generator_with_correction_s=full_s, generator_clean_only_s=clean_s,
        correction_cost=full_s / clean_s, model_flops=model_flops_mean,
        achieved_flops_per_s=model_flops_mean / device_s, mfu=model_flops_mean / device_s / peak)


# ---------------------------------------------------------------------------------------------------- GPT

def random_codes(num_tokens: int, batch: int, vocab: int, num_classes: int, rng: np.random.Generator):
    """Endless host batches shaped like the code pipeline's (random tokens and labels)."""
    while True:
        yield {"codes": rng.integers(0, vocab, (batch, num_tokens, 3)).astype(np.int16),
               "label": rng.integers(0, num_classes, (batch,)).astype(np.int32)}


def bench_gpt(config, steps: int, repeats: int, peak: float, codes_dir: str | None) -> dict:
    from detailflow_jax.train.ar_step import ARStep

    m = config.model
    if not config.total_steps:
        config.total_steps = 1000  # only shapes the schedule
    mesh = sharding.make_mesh((config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
    trainer = ARStep(config, mesh)
    state, shardings = trainer.init(config.seed)
    if codes_dir:
        from detailflow_jax.data.codes import make_code_iter
        stream = make_code_iter(codes_dir, config.batch_size, config.seed, num_threads=config.data_threads)
        data, close = stream.iterator, stream.close
    else:
        data = random_codes(m.num_tokens, config.batch_size, m.vocab_size, m.num_classes, np.random.default_rng(0))
        close = lambda: None
    host_batch = next(data)
    batch = to_global(host_batch, mesh)
    fn = trainer.compiled(shardings)
    flops_xla = lowered_flops(fn.lower(state, batch))
    chain = Chain(fn, state, batch)
    first = seconds(chain)
    device_s = seconds(chain, repeats)
    state = chain.state
    host = dict(data_s=host_seconds(lambda _: next(data), steps),
                to_global_s=host_seconds(lambda _: jax.block_until_ready(to_global(host_batch, mesh)), steps))
    loop_s, state = time_loop(lambda s, b, _: fn(s, to_global(b, mesh)), state, data, 0, steps)
    close()
    flops = model_flops.gpt_step(trainer.model_cfg, state["params"], config.batch_size)
    return dict(batch=config.batch_size, data="codes" if codes_dir else "random codes", num_programs=1,
                compile_s=max(first - device_s, 0.0), device_step_s=device_s, loop_step_s=loop_s,
                steps_per_s=1 / loop_s, images_per_s=config.batch_size / loop_s,
                host_share=max(loop_s - device_s, 0.0) / loop_s, host=host, model_flops=flops, xla_flops=flops_xla,
                achieved_flops_per_s=flops / device_s, mfu=flops / device_s / peak)


# ---------------------------------------------------------------------------------------------------- report

def print_report(result: dict) -> None:
    peak = result["peak_flops_per_s"]
    print(f"\ndevice {result['device']}, measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'recipe':<10}{'steps/s':>9}{'img/s':>9}{'loop ms':>9}{'device ms':>11}{'host %':>8}{'compile s':>11}"
          f"{'programs':>10}{'GFLOP/step':>12}{'MFU':>7}")
    for name in ("tokenizer", "gpt"):
        r = result.get(name)
        if r is None:
            continue
        print(f"{name:<10}{r['steps_per_s']:>9.2f}{r['images_per_s']:>9.1f}{1e3 * r['loop_step_s']:>9.1f}"
              f"{1e3 * r['device_step_s']:>11.1f}{100 * r['host_share']:>8.1f}{r['compile_s']:>11.1f}"
              f"{r['num_programs']:>10d}{r['model_flops'] / 1e9:>12.2f}{r['mfu']:>7.1%}")
        print("  host work per iteration: " + ", ".join(f"{k[:-2]} {1e3 * v:.2f} ms" for k, v in r["host"].items()))
    tok = result.get("tokenizer")
    if tok:
        print(f"\n{'canvas':>7}{'t':>5}{'share':>8}{'compile s':>11}{'step ms':>9}{'GFLOP model':>13}"
              f"{'GFLOP XLA':>11}{'GFLOP/s':>9}")
        for r in tok["canvases"]:
            xla = f"{r['xla_flops'] / 1e9:.2f}" if r["xla_flops"] else "-"
            print(f"{r['canvas']:>7}{r['t']:>5}{r['share']:>8.1%}{r['compile_s']:>11.2f}{1e3 * r['step_s']:>9.1f}"
                  f"{r['model_flops'] / 1e9:>13.2f}{xla:>11}{r['flops_per_s'] / 1e9:>9.1f}")
        print(f"self-correction: the generator pass with it (2 encodes, 2B decoded) takes "
              f"{tok['correction_cost']:.2f}x the clean-only pass ({1e3 * tok['generator_with_correction_s']:.1f} vs "
              f"{1e3 * tok['generator_clean_only_s']:.1f} ms, full canvas)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("tokenizer", "gpt", "both"), default="both")
    p.add_argument("--tokenizer_config", default="configs/tokenizer_fashion_mnist.py")
    p.add_argument("--gpt_config", default="configs/ar_fashion_mnist.py")
    p.add_argument("--codes_dir", default=None, help="extracted codes for the GPT's pipeline (default: random codes)")
    p.add_argument("--steps", type=int, default=20, help="loop iterations timed (and host calls averaged)")
    p.add_argument("--repeats", type=int, default=3, help="steady calls timed per compiled program (median)")
    args = p.parse_args(argv)

    peak = measure_peak_flops(jnp.float32)
    result = {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(), "peak_flops_per_s": peak,
              "tokenizer_config": args.tokenizer_config, "gpt_config": args.gpt_config}
    if args.part in ("tokenizer", "both"):
        result["tokenizer"] = bench_tokenizer(load_config_file(args.tokenizer_config), args.steps, args.repeats, peak)
    if args.part in ("gpt", "both"):
        result["gpt"] = bench_gpt(load_config_file(args.gpt_config), args.steps, args.repeats, peak, args.codes_dir)
    print_report(result)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
