r"""KV-cache sampler vs the no-cache reference sampler (the official algorithm), same model, same
run.

    python benchmarks/sampling.py --variant GPT-B --num_tokens 128 --group_size 8 --causal_num 8 --batch 4 \
        --cfg_scale 1.5 [--dtype bf16|fp32] [--decode] [--no_reference] [--repeats 3] [--scan]

Random-init parameters (nothing is downloaded). Both samplers are timed after a warm-up call; the
warm-up of the cached sampler is its compilation (reported as compile_s), the reference is compiled
once per prefix length in its warm-up pass (the official sampler uses torch.compile the same way).
With --decode, decoding all N tokens with a small random tokenizer is inside the timer for both (as
in the paper's timing). The last line printed is one JSON object.

FLOPs are analytic "useful" model FLOPs of the cached sampler per image: every matmul of every step
(the CFG doubling included) plus attention over the keys each query may see; achieved = FLOPs per
image x images per second.

Small batches are memory bound: every step reads all weights (and the visible KV-cache chunks) once.
The roofline of the cached sampler is the sum over its steps of max(step FLOPs / measured matmul
peak, step bytes / measured read bandwidth) — no implementation of this algorithm on this device can
beat it; `roofline_speedup` is the speedup over the measured reference that it would give.
"""  # noqa: E501

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.peaks import measure_peak_bandwidth, measure_peak_flops  # noqa: E402
from detailflow_jax import cli, cli_errors  # noqa: E402
from detailflow_jax.ar.masks import group_causal_mask  # noqa: E402
from detailflow_jax.ar.model import GPT, GPTConfig, init_params  # noqa: E402
from detailflow_jax.ar.reference import ReferenceSampler  # noqa: E402
from detailflow_jax.ar.sampling import Sampler, SamplingSettings  # noqa: E402

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def sampler_flops_per_image(cfg: GPTConfig, guided: bool) -> float:
    """Useful FLOPs of one image's cached sampling: matmuls of every processed position +
    visible-key attention."""
    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    # keys per position
    visible = group_causal_mask(cfg.num_tokens, cfg.group_size, cfg.causal_num).sum(axis=1)
    positions = cfg.num_tokens  # every sequence position 0..N-1 is processed exactly once
    dense = 2 * positions * (cfg.n_layer * (4 * d * d + 3 * d * f) + d * v)
    attention = cfg.n_layer * 2 * 2 * d * float(visible.sum())
    return (dense + attention) * (2 if guided else 1)


def sampler_roofline(cfg: GPTConfig, rows: int, cache_chunks: int, peak_flops: float,
                     peak_bytes_per_s: float) -> tuple[float, float]:
    """(bytes read per batch, roofline seconds per batch) of the cached sampler: `rows` sequences
    (2B with CFG); each step reads every weight and the cache chunks up to the one it writes, and
    computes what it reads."""
    d, f, v, layers = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_layer
    itemsize = jnp.dtype(cfg.dtype).itemsize
    weights = layers * (4 * d * d + 3 * d * f) + d * v
    chunk_len = cfg.num_tokens // cache_chunks
    first_slots = list(range(cfg.causal_num)) + list(
        range(cfg.causal_num, cfg.num_tokens, cfg.group_size)
    )
    total_bytes = total_s = 0.0
    for step, slot in enumerate(first_slots):
        new = 1 if step < cfg.causal_num else cfg.group_size
        keys = (slot // chunk_len + 1) * chunk_len  # keys the step attends to (whole chunks)
        step_bytes = itemsize * (weights + rows * layers * 2 * d * keys)
        step_flops = 2 * rows * new * (weights + layers * 2 * d * keys)
        total_bytes += step_bytes
        total_s += max(step_flops / peak_flops, step_bytes / peak_bytes_per_s)
    return total_bytes, total_s


def time_calls(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def warm_and_time(fn, repeats: int) -> tuple[float, float, list[float]]:
    """(first call s, median steady s, steady times): the first call includes compilation."""
    first = time_calls(fn, 1)[0]
    times = time_calls(fn, repeats)
    return first, float(np.median(times)), times


def make_decoder(cfg: GPTConfig, key):
    """A small random tokenizer with the GPT's (N, g, C, vocab) and a jitted full decode."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs.tokenizer import model_config
    from detailflow_jax.tokenizer.model import DetailFlowTokenizer, init_params as init_tokenizer
    tok_cfg = model_config("small")
    tok_cfg.update(
        num_latent_tokens=cfg.num_tokens,
        group_size=cfg.group_size,
        causal_num=cfg.causal_num,
        codebook_size=cfg.vocab_size,
        image_size=256,
    )
    tok_params = init_tokenizer(tok_cfg, key)
    model = DetailFlowTokenizer(tok_cfg)
    return jax.jit(lambda codes: model.apply({"params": tok_params}, codes, method="decode_code"))


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("variant", "GPT-B", "GPT-B, GPT-L, GPT-XL, ... (official LlamaGen sizes)",
                        flag_values=fv)
    flags.DEFINE_integer("num_tokens", 128, "tokens per image", flag_values=fv)
    flags.DEFINE_integer("group_size", 8, "tokens sampled per step", flag_values=fv)
    flags.DEFINE_integer("causal_num", 8, "causal groups of the mask", flag_values=fv)
    flags.DEFINE_integer("batch", 4, "images per sampling call", flag_values=fv)
    flags.DEFINE_float("cfg_scale", 1.5, "1 disables CFG (no doubled batch)", flag_values=fv)
    flags.DEFINE_enum("dtype", "fp32", sorted(DTYPES), "GPT compute dtype", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "timed calls of the cached sampler", flag_values=fv)
    flags.DEFINE_integer("reference_repeats", 1, "timed calls of the reference sampler",
                         flag_values=fv)
    flags.DEFINE_bool("decode", False, "include decoding with a small random tokenizer",
                      flag_values=fv)
    flags.DEFINE_bool("no_reference", False, "skip the slow no-cache baseline", flag_values=fv)
    flags.DEFINE_bool("scan", False, "weights stacked for nn.scan (the cached sampler then splits "
                      "them at every call)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the random weights and labels", flag_values=fv)


def main(argv: list[str] | None = None) -> dict:
    args = cli.parse(argv, __doc__, _define_flags)

    name = args.variant.removeprefix("GPT-")
    cfg = GPTConfig.from_variant(name, num_tokens=args.num_tokens, group_size=args.group_size,
                                 causal_num=args.causal_num, dtype=DTYPES[args.dtype],
                                 scan_layers=args.scan).validate()
    key = jax.random.key(args.seed)
    model = GPT(cfg)
    params = jax.jit(lambda k: init_params(model, k))(key)
    params = nn.unbox(params)
    labels = jax.random.randint(jax.random.fold_in(key, 1), (args.batch,), 0, cfg.num_classes)
    settings = SamplingSettings.create(cfg_scale=args.cfg_scale)
    decode = (
        make_decoder(cfg, jax.random.fold_in(key, 2)) if args.decode else (lambda tokens: tokens)
    )

    print(
        f"{args.variant} N={cfg.num_tokens} g={cfg.group_size} C={cfg.causal_num} "
        f"batch={args.batch} "
        f"cfg={args.cfg_scale} dtype={args.dtype} steps={cfg.num_steps} "
        f"device={jax.devices()[0].device_kind} "
        f"params={sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e6:.1f}M",
        flush=True,
    )

    def time_sampler(sampler, repeats):
        """(first call s, steady s per batch, steady runs, compile s) of sampling and decoding one
        batch."""
        first, steady, times = warm_and_time(
            lambda: decode(sampler(params, labels, jax.random.fold_in(key, 3), settings)), repeats)
        return first, steady, times, max(first - steady, 0.0)

    cached = Sampler(model)
    first, cached_s, cached_times, compile_s = time_sampler(cached, args.repeats)
    print(
        f"cached:    first call {first:.2f}s (compile ~{compile_s:.2f}s), steady {cached_s:.3f}s "
        "per batch "
        f"(runs: {', '.join(f'{t:.3f}' for t in cached_times)})",
        flush=True,
    )

    nocache_s = ref_compile_s = None
    if not args.no_reference:
        ref_first, nocache_s, _, ref_compile_s = time_sampler(
            ReferenceSampler(model), args.reference_repeats
        )
        print(
            f"reference: first pass {ref_first:.2f}s (compile ~{ref_compile_s:.2f}s over "
            f"{cfg.num_steps} "
            f"lengths), steady {nocache_s:.3f}s per batch",
            flush=True,
        )

    peak = measure_peak_flops(jnp.dtype(cfg.dtype))
    bandwidth = measure_peak_bandwidth()
    flops = sampler_flops_per_image(cfg, settings.guidance)
    rows = args.batch * (2 if settings.guidance else 1)
    bytes_per_batch, roofline_s = sampler_roofline(cfg, rows, cached.cache_chunks, peak, bandwidth)
    result = {
        "variant": args.variant,
        "num_tokens": cfg.num_tokens,
        "group_size": cfg.group_size,
        "causal_num": cfg.causal_num,
        "batch": args.batch,
        "cfg_scale": args.cfg_scale,
        "dtype": args.dtype,
        "decode": args.decode,
        "steps": cfg.num_steps,
        "device": jax.devices()[0].device_kind,
        "cache_s_per_batch": cached_s,
        "cache_images_per_s": args.batch / cached_s,
        "nocache_s_per_batch": nocache_s,
        "nocache_images_per_s": None if nocache_s is None else args.batch / nocache_s,
        "speedup": None if nocache_s is None else nocache_s / cached_s,
        "compile_s": compile_s,
        "nocache_compile_s": ref_compile_s,
        "model_flops_per_image": flops,
        "achieved_flops_per_s": flops * args.batch / cached_s,
        "peak_flops_per_s": peak,
        "cache_chunks": cached.cache_chunks,
        "bytes_per_batch": bytes_per_batch,
        "achieved_bytes_per_s": bytes_per_batch / cached_s,
        "peak_bytes_per_s": bandwidth,
        "roofline_s_per_batch": roofline_s,
        "roofline_speedup": None if nocache_s is None else nocache_s / roofline_s,
    }
    print()
    print(f"{'sampler':<10}{'s/batch':>10}{'img/s':>10}{'compile s':>11}")
    print(f"{'kv-cache':<10}{cached_s:>10.3f}{args.batch / cached_s:>10.3f}{compile_s:>11.2f}")
    if nocache_s is not None:
        print(
            f"{'no-cache':<10}{nocache_s:>10.3f}{args.batch / nocache_s:>10.3f}"
            f"{ref_compile_s:>11.2f}"
        )
        print(f"speedup {nocache_s / cached_s:.1f}x")
    print(
        f"model FLOPs/image {flops / 1e9:.1f} G, achieved "
        f"{result['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s, "
        f"measured matmul peak {peak / 1e9:.1f} GFLOP/s "
        f"({result['achieved_flops_per_s'] / peak:.1%})"
    )
    print(
        f"reads {bytes_per_batch / 1e9:.2f} GB per batch: "
        f"{result['achieved_bytes_per_s'] / 1e9:.1f} GB/s, measured "
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"({result['achieved_bytes_per_s'] / bandwidth:.1%}); roofline "
        f"{roofline_s:.3f}s per batch ({roofline_s / cached_s:.0%} of the measured time)"
        + (
            ""
            if nocache_s is None
            else f", i.e. at most {nocache_s / roofline_s:.1f}x over the reference"
        )
    )
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    cli_errors.run(main)
