r"""Where a training step's time goes: the tokenizer and GPT steps of the main job's recipes, timed
in one run.

    python benchmarks/training.py [--part tokenizer|gpt|both] [--steps 20] [--repeats 3] \
        [--codes_dir workdir/fashion_mnist/codes] [--tokenizer_config configs/tokenizer_fashion_mnist.py] \
        [--gpt_config configs/ar_fashion_mnist.py]

Random-init models with the recipes' shapes (configs/tokenizer_fashion_mnist.py,
configs/ar_fashion_mnist.py, as the main job runs them); the tokenizer reads the recipe's real data
pipeline (Fashion-MNIST), the GPT its extracted codes when ``--codes_dir`` is given, else random
codes of the right shape. Measured, per recipe:

* compile: the first call of every compiled program (one per decoder canvas for the tokenizer),
  minus a steady call; and, as the tokenizer trainer does before its loop, every canvas compiled
  ahead one and two at a time;
* device: the jitted step alone, repeated on one batch already on the device (``block_until_ready``
  each call); the tokenizer's is averaged over the canvases in the proportions the recipe's own host
  draws pick them (steps 0 .. total_steps - 1, as a real run does);
* host: each piece of host work of an iteration timed on its own (the next batch from the pipeline,
  the per-step draws, placing the batch on the mesh);
* loop: ``--steps`` iterations of the trainer's own step function on the pipeline's batches,
  compiled already, as the training loop runs them (no sync per step; one at the end): steps/s and
  images/s;
* self-correction: the tokenizer's generator pass (forward + backward) with the doubled 2B decode
  and the second encoder pass, against the same pass on the clean B images alone;
* FLOP/s: analytic model FLOPs (``detailflow_jax.preflight.model_flops``) and XLA's count of the
  lowered step, achieved = FLOPs / device time, against the matmul peak measured in the same run
  (``benchmarks/peaks.py``).

Prints a table and, last, one JSON object. On a shared machine compare ratios within one run, not
absolute times.
"""  # noqa: E501

from __future__ import annotations

import collections
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.peaks import measure_peak_flops  # noqa: E402
from detailflow_jax import cli, cli_errors, config_lib, sharding  # noqa: E402
from detailflow_jax.data.global_batch import to_global  # noqa: E402
from detailflow_jax.preflight import model_flops  # noqa: E402
from detailflow_jax.tokenizer.degradation import degrade  # noqa: E402
from detailflow_jax.tokenizer.model import DetailFlowTokenizer  # noqa: E402


def seconds(fn, repeats: int = 1) -> float:
    """Median wall seconds of ``fn()`` (blocked until its outputs are ready)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def lowered_flops(lowered) -> float | None:
    """XLA's FLOP count of a lowered (not yet optimised) program, or None when the backend gives
    none."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


class LiveState:
    """The one train state every timed call steps: each call donates it and keeps the state it
    returns."""

    def __init__(self, state):
        self.state = state

    def caller(self, fn, *args):
        def call():
            self.state, metrics = fn(self.state, *args)
            return metrics
        return call


def time_loop(step_fn, state, data, first_step: int, steps: int):
    """Runs ``steps`` loop iterations back to back (no sync per step, one at the end), as the
    training loop does. Returns (seconds per iteration, host seconds per iteration: waiting for the
    batch + dispatching the step, final state)."""
    host = 0.0
    start = time.perf_counter()
    for step in range(first_step, first_step + steps):
        tick = time.perf_counter()
        batch = next(data)
        state, metrics = step_fn(state, batch, step)
        host += time.perf_counter() - tick
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps, host / steps, state


def host_seconds(fn, repeats: int) -> float:
    """Mean seconds of a host-side call (nothing to block on)."""
    start = time.perf_counter()
    for i in range(repeats):
        fn(i)
    return (time.perf_counter() - start) / repeats


def interleaved(calls: dict, rounds: int) -> dict:
    """{name: median seconds}: every call once per round, round after round, so that a machine
    shared with other work slows them all alike (the ratios stay meaningful)."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(seconds(fn))
    return {name: float(np.median(v)) for name, v in times.items()}


# ---------------------------------------------------------------------------------------- tokenizer

def generator_passes(
    model_cfg, params, images, t, canvas, matrix, noise_idx, noise_end, key
) -> dict:
    """Jitted forward + backward passes of pieces of the generator's loss at one canvas: as trained
    (clean + self-corrected: two encodes, 2B decoded), on the clean B images alone (one encode, B
    decoded), the encoder alone (B) and the decoder alone (2B)."""
    model = DetailFlowTokenizer(model_cfg)
    target = degrade(images, matrix)
    b = images.shape[0]
    quant = model.apply({"params": params}, images, method="encode")["quant"]
    quant2 = jnp.concatenate([quant, quant])

    def with_correction(p):
        out = model.apply({"params": p}, images, t, canvas, noise_idx, noise_end, key, True)
        return jnp.mean((out["recon"] - jnp.concatenate([target, target])) ** 2)

    def clean_only(p):
        q = model.apply({"params": p}, images, method="encode")["quant"]
        return jnp.mean((model.apply({"params": p}, q, t, canvas, method="decode") - target) ** 2)

    def encoder(p):
        return jnp.mean(model.apply({"params": p}, images, method="encode")["pre_quant"] ** 2)

    def decoder(p):
        return jnp.mean(model.apply({"params": p}, quant2, t, canvas, method="decode") ** 2)

    passes = {
        "with_correction": with_correction,
        "clean_only": clean_only,
        f"encoder_B{b}": encoder,
        f"decoder_2B{2 * b}": decoder,
    }
    return {name: functools.partial(jax.jit(jax.grad(fn)), params) for name, fn in passes.items()}


def bench_tokenizer(config, steps: int, repeats: int) -> dict:
    from detailflow_jax.data.pipeline import make_train_iter
    from detailflow_jax.train.tokenizer import HostDraws, make_step_fn, validate
    from detailflow_jax.train.tokenizer_step import (
        compile_canvases,
        load_frozen,
        make_tokenizer_step,
    )

    mesh = sharding.make_mesh(validate(config, jax.device_count()))
    frozen = load_frozen(config)
    program = make_tokenizer_step(config, mesh, frozen)
    state = program.init(config.seed)
    tables = program.tables
    draws = HostDraws(config, tables)
    # (t, canvas) of every step of the recipe
    recipe = [draws(s)[:2] for s in range(config.total_steps)]
    share = collections.Counter(canvas for _, canvas in recipe)
    first_step_of = {}
    for s, (_, canvas) in enumerate(recipe):
        first_step_of.setdefault(canvas, s)

    data = make_train_iter(config.data, config.batch_size, config.seed)
    host_batch = next(data)
    images = to_global(host_batch["image"], mesh)
    live, calls, rows = LiveState(state), {}, {}
    for canvas in sorted(share):
        t, _, matrix, noise_idx, noise_end = draws(first_step_of[canvas])
        fn = program.steps[canvas]
        args = (frozen.params, images, np.int32(t), matrix, noise_idx, noise_end)
        flops_xla = lowered_flops(fn.lower(live.state, *args))
        calls[canvas] = live.caller(fn, *args)
        first = seconds(calls[canvas])  # compiles
        rows[canvas] = dict(
            canvas=canvas,
            t=int(t),
            share=share[canvas] / config.total_steps,
            first_s=first,
            model_flops=model_flops.tokenizer_step(config, frozen, canvas, config.batch_size),
            xla_flops=flops_xla,
        )
        print(f"  tokenizer canvas {canvas}: first call {first:.1f} s", flush=True)
    # What the trainer does before its loop: every canvas compiled ahead, one at a time vs two at a
    # time (a fresh program, so nothing is cached).
    ahead_compile_s = {}
    for workers in (1, 2):
        start = time.perf_counter()
        compile_canvases(
            make_tokenizer_step(config, mesh, frozen), sorted(share, reverse=True), workers
        )
        ahead_compile_s[workers] = time.perf_counter() - start
        print(f"  tokenizer: all {len(share)} canvases compiled ahead, {workers} at a time: "
              f"{ahead_compile_s[workers]:.1f} s", flush=True)
    steady = interleaved(calls, repeats)
    for canvas, r in rows.items():
        r.update(step_s=steady[canvas], compile_s=max(r.pop("first_s") - steady[canvas], 0.0),
                 flops_per_s=r["model_flops"] / steady[canvas])
    rows = list(rows.values())
    device_s = sum(r["share"] * r["step_s"] for r in rows)
    model_flops_mean = sum(r["share"] * r["model_flops"] for r in rows)

    host = dict(
        data_s=host_seconds(lambda _: next(data), steps),
        draws_s=host_seconds(
            lambda i: HostDraws(config, tables)(i), steps
        ),  # fresh: no cached matrices
        to_global_s=host_seconds(
            lambda _: jax.block_until_ready(to_global(host_batch["image"], mesh)), steps
        ),
    )
    step_fn = make_step_fn(program.steps, draws, frozen, mesh)
    # all canvases compiled
    loop_s, loop_host_s, live.state = time_loop(step_fn, live.state, data, 0, steps)
    loop_device_s = float(np.mean([steady[canvas] for _, canvas in recipe[:steps]]))
    data.close()

    t_full = tables.num_tokens
    _, _, matrix, noise_idx, noise_end = draws(
        next(s for s, (t, _) in enumerate(recipe) if t == t_full)
    )
    # the steps timed beside them donate the state
    params = jax.tree.map(jnp.copy, live.state["params"])
    passes = generator_passes(
        program.model_cfg,
        params,
        images,
        t_full,
        tables.canvas[t_full],
        matrix,
        noise_idx,
        noise_end,
        jax.random.key(0),
    )
    for fn in passes.values():
        seconds(fn)  # compiles
    passes_s = interleaved({"step": calls[tables.canvas[t_full]], **passes}, repeats)
    batch = config.batch_size
    return dict(
        batch=batch,
        canvases=rows,
        num_programs=len(rows),
        compile_s=sum(r["compile_s"] for r in rows),
        ahead_compile_s=ahead_compile_s,
        device_step_s=device_s,
        loop_step_s=loop_s,
        loop_device_s=loop_device_s,
        loop_host_s=loop_host_s,
        steps_per_s=1 / loop_s,
        images_per_s=batch / loop_s,
        host=host,
        full_canvas_passes_s=passes_s,
        correction_cost=passes_s["with_correction"] / passes_s["clean_only"],
        model_flops=model_flops_mean,
        achieved_flops_per_s=model_flops_mean / device_s,
    )


# ---------------------------------------------------------------------------------------------- GPT

def random_codes(
    num_tokens: int, batch: int, vocab: int, num_classes: int, rng: np.random.Generator
):
    """Endless host batches shaped like the code pipeline's (random tokens and labels)."""
    while True:
        yield {"codes": rng.integers(0, vocab, (batch, num_tokens, 3)).astype(np.int16),
               "label": rng.integers(0, num_classes, (batch,)).astype(np.int32)}


def bench_gpt(config, steps: int, repeats: int, codes_dir: str | None) -> dict:
    from detailflow_jax.train.ar_step import make_ar_step

    m = config.model
    if not config.total_steps:
        config.total_steps = 1000  # only shapes the schedule
    mesh = sharding.make_mesh((config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
    program = make_ar_step(config, mesh)
    state = program.init(config.seed)
    if codes_dir:
        from detailflow_jax.data.codes import make_code_iter

        stream = make_code_iter(
            codes_dir, config.batch_size, config.seed, num_threads=config.data_threads
        )
        data, close = stream.iterator, stream.close
    else:
        data = random_codes(
            m.num_tokens, config.batch_size, m.vocab_size, m.num_classes, np.random.default_rng(0)
        )
        close = lambda: None
    host_batch = next(data)
    batch = to_global(host_batch, mesh)
    fn = program.step
    flops_xla = lowered_flops(fn.lower(state, batch))
    live = LiveState(state)
    call = live.caller(fn, batch)
    first = seconds(call)  # compiles
    device_s = interleaved({"step": call}, repeats)["step"]
    host = dict(
        data_s=host_seconds(lambda _: next(data), steps),
        to_global_s=host_seconds(
            lambda _: jax.block_until_ready(to_global(host_batch, mesh)), steps
        ),
    )
    loop_s, loop_host_s, live.state = time_loop(
        lambda s, b, _: fn(s, to_global(b, mesh)), live.state, data, 0, steps
    )
    close()
    flops = model_flops.gpt_step(program.model_cfg, live.state["params"], config.batch_size)
    return dict(
        batch=config.batch_size,
        data="codes" if codes_dir else "random codes",
        num_programs=1,
        compile_s=max(first - device_s, 0.0),
        device_step_s=device_s,
        loop_step_s=loop_s,
        loop_device_s=device_s,
        loop_host_s=loop_host_s,
        steps_per_s=1 / loop_s,
        images_per_s=config.batch_size / loop_s,
        host=host,
        model_flops=flops,
        xla_flops=flops_xla,
        achieved_flops_per_s=flops / device_s,
    )


# ------------------------------------------------------------------------------------------- report

def print_report(result: dict) -> None:
    peak = result["peak_flops_per_s"]
    print(
        f"\ndevice {result['device']} x {result['num_devices']}, measured fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s"
    )
    print(
        f"{'recipe':<10}{'batch':>6}{'steps/s':>9}{'img/s':>8}{'loop ms':>9}{'device ms':>11}"
        f"{'host ms':>9}"
        f"{'compile s':>11}{'programs':>10}{'GFLOP/step':>12}{'MFU':>7}"
    )
    for name in ("tokenizer", "gpt"):
        r = result.get(name)
        if r is None:
            continue
        print(
            f"{name:<10}{r['batch']:>6d}{r['steps_per_s']:>9.2f}{r['images_per_s']:>8.1f}"
            f"{1e3 * r['loop_step_s']:>9.1f}{1e3 * r['loop_device_s']:>11.1f}"
            f"{1e3 * r['loop_host_s']:>9.1f}"
            f"{r['compile_s']:>11.1f}{r['num_programs']:>10d}{r['model_flops'] / 1e9:>12.2f}"
            f"{r['mfu']:>7.1%}"
        )
        print("  host work per iteration, each piece alone: "
              + ", ".join(f"{k[:-2]} {1e3 * v:.2f} ms" for k, v in r["host"].items()))
    tok = result.get("tokenizer")
    if tok:
        print(
            f"\n{'canvas':>7}{'t':>5}{'share':>8}{'compile s':>11}{'step ms':>9}{'GFLOP model':>13}"
            f"{'GFLOP XLA':>11}{'GFLOP/s':>9}"
        )
        for r in tok["canvases"]:
            xla = f"{r['xla_flops'] / 1e9:.2f}" if r["xla_flops"] else "-"
            print(
                f"{r['canvas']:>7}{r['t']:>5}{r['share']:>8.1%}{r['compile_s']:>11.2f}"
                f"{1e3 * r['step_s']:>9.1f}"
                f"{r['model_flops'] / 1e9:>13.2f}{xla:>11}{r['flops_per_s'] / 1e9:>9.1f}"
            )
        passes = tok["full_canvas_passes_s"]
        print(
            "full canvas, forward + backward: "
            + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in passes.items())
        )
        print(
            "self-correction (a second encode, 2B decoded) makes the generator pass "
            f"{tok['correction_cost']:.2f}x "
            "the clean-only one"
        )
        ahead = tok["ahead_compile_s"]
        print(
            f"all canvases compiled before the loop: {ahead[1]:.1f} s one at a time, {ahead[2]:.1f}"
            " s two at a "
            f"time ({ahead[1] / ahead[2]:.2f}x)"
        )


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("part", "both", ["tokenizer", "gpt", "both"], "which recipe to time",
                      flag_values=fv)
    for name, default in (("tokenizer_config", "configs/tokenizer_fashion_mnist.py"),
                          ("gpt_config", "configs/ar_fashion_mnist.py")):
        cli.define_config(fv, name, config_lib.config_path(default), cli.CONFIG_HELP + "; override "
                          f"fields with --{name}.key=value")
    flags.DEFINE_string("codes_dir", None, "extracted codes for the GPT's pipeline (default: "
                        "random codes)", flag_values=fv)
    flags.DEFINE_integer("steps", 20, "loop iterations timed (and host calls averaged)",
                         flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "steady calls timed per compiled program (median)",
                         flag_values=fv)
    flags.DEFINE_integer("tokenizer_batch", 0, "override the tokenizer recipe's batch size",
                         flag_values=fv)
    flags.DEFINE_integer("gpt_batch", 0, "override the GPT recipe's batch size", flag_values=fv)


def main(argv: list[str] | None = None) -> dict:
    args = cli.parse(argv, __doc__, _define_flags)
    result = {"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
              **{name: args[name].config_filename for name in ("tokenizer_config", "gpt_config")}}
    peaks = [measure_peak_flops(jnp.float32)]
    if args.part in ("tokenizer", "both"):
        config = cli.loaded_config(args, "tokenizer_config")
        config.batch_size = args.tokenizer_batch or config.batch_size
        result["tokenizer"] = bench_tokenizer(config, args.steps, args.repeats)
    if args.part in ("gpt", "both"):
        config = cli.loaded_config(args, "gpt_config")
        config.batch_size = args.gpt_batch or config.batch_size
        result["gpt"] = bench_gpt(config, args.steps, args.repeats, args.codes_dir)
    # Measured before and after the recipes, the best kept: other work on a shared machine only
    # lowers it.
    peaks.append(measure_peak_flops(jnp.float32))
    result["peak_flops_per_s"] = peak = max(peaks)
    for name in ("tokenizer", "gpt"):
        if name in result:
            result[name]["mfu"] = result[name]["achieved_flops_per_s"] / peak
    print_report(result)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    cli_errors.run(main)
