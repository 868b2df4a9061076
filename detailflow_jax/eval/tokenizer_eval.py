r"""Tokenizer evaluation along the coarse-to-fine axis: rFID, PSNR and SSIM from the first t tokens,
for every admissible t, on the validation split.

    python -m detailflow_jax.eval.tokenizer_eval --tokenizer workdir/tok --inception INCEPTION --out DIR
    python -m detailflow_jax.eval.tokenizer_eval --tokenizer /ckpt/df16 --tokenizer_config configs/tokenizer.py:DF-16 \
        --data_config configs/tokenizer_imagenet.py:DF-16 --data_dir /data/tfds --inception INCEPTION --out DIR \
        [--num_images 50000] [--batch_size 64] [--token_counts 8,64,128] [--official_ssim] \
        [--noisy_eval]

Data: ``--data_config FILE.py:ARG`` (its ``data`` section; ``--data_config.data.key=value``
overrides a field as in the trainers), else the tokenizer work directory's own config; the
``--data``/``--data_dir``/``--eval_split``/``--image_size`` flags override single fields. Images are
ADM centre-cropped (docs/fidelity.md#evaluation).

Per t, every image is encoded once, decoded from its first t tokens at the canvas of t,
bicubic-upsampled to the full size R (``ReconstructionEvaluator``) and scored:
  * PSNR (dB): ``inference/reconstruction.psnr`` on [0, 1] (the float reconstruction, clipped; the
    official script quantises it to uint8 first, a difference of about 1e-3 dB);
  * SSIM: the standard definition (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1 on
    [0, 1]) of the uint8 reconstruction against the original. The official script uses skimage with
    ``data_range=2.0`` (docs/fidelity.md#evaluation), which inflates SSIM; ``--official_ssim``
    reproduces that number instead;
  * rFID: Fréchet distance between the Inception pool features of the uint8 reconstructions and of
    the real centre-cropped images (the ImageNet-val convention of peer tokenizers; the official
    script uses torchmetrics, whose Inception input matches ``--preprocess adm``).

``--noisy_eval`` adds the official robustness sweep (``reconstruct_vq.py --noisy-eval``): all N
tokens decoded after the self-correction encode with the codes at one noise index replaced by random
top-k codes and the rest re-encoded after them, for the indices of ``noisy_eval_indices`` (-1 =
clean). It is off by default (the official default is on): the official script scores only t = N,
here the default is the whole curve, and each noise index costs about two encoder passes and a
full-size decode per image, which roughly doubles a full-curve run and multiplies a
``--token_counts N`` run several times.

Writes DIR/tokenizer_eval.json (settings, one row per t under "curve", one per noise index under
"noisy"), DIR/tokenizer_curve.png (PSNR, SSIM and rFID against t), with the sweep
DIR/tokenizer_noisy.png (against the noise index), and prints the tables.
Each t keeps a 2048x2048 float64 covariance (32 MiB): all 71 counts of N = 512 need 2.3 GiB;
pass ``--token_counts`` to evaluate fewer.
"""  # noqa: E501

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from detailflow_jax import cli, cli_errors, distributed, sharding, storage
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.eval import cli_flags
from detailflow_jax.eval import ssim as ssim_lib
from detailflow_jax.eval.fid import fid_between
from detailflow_jax.nn.inception import POOL_DIM
from detailflow_jax.eval.metrics import RunningStats
from detailflow_jax.inference.reconstruction import ReconstructionEvaluator
from detailflow_jax.pixels import to_uint8
from detailflow_jax.tokenizer.degradation import noise_span_at

METRICS = ("psnr", "ssim", "rfid")
STANDARD_SSIM_NOTE = (
    "SSIM: standard definition (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03) on [0, 1] images "
    "with data_range 1. The official DetailFlow script calls skimage with data_range=2.0 on [0, 1] "
    "images (docs/fidelity.md#evaluation), which inflates SSIM; --official_ssim reproduces it."
)
OFFICIAL_SSIM_NOTE = (
    "SSIM: the official DetailFlow number, skimage.metrics.structural_similarity defaults (7x7 "
    "uniform window, sample covariance) with data_range=2.0 on [0, 1] images "
    "(docs/fidelity.md#evaluation); higher than the standard definition."
)


# On device: the result feeds the Inception, so it stays a sharded global array. The official
# evaluation converts its float32 inputs in float32 and the bf16 decoder's reconstructions in
# bfloat16 (``detailflow_jax.pixels``).
_real_to_uint8 = jax.jit(functools.partial(to_uint8, arithmetic="float32"))
_recon_to_uint8 = jax.jit(functools.partial(to_uint8, arithmetic="bfloat16"))


@jax.jit
def _ssim_inputs(recon_u8: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Official: the uint8 reconstruction / 255 against the float original mapped to [0, 1].
    return recon_u8.astype(jnp.float32) / 255.0, (images.astype(jnp.float32) + 1.0) / 2.0


def noisy_eval_indices(num_tokens: int, group_size: int) -> list[int]:
    """The official robustness sweep (``reconstruct_vq.py --noisy-eval``): -1 (clean), then the
    first token of the groups 0, M/4, M/2, 3M/4 and M-1 (M = N / g groups); repeats, possible when
    M < 4, are dropped."""
    m = num_tokens // group_size
    groups = (0, m // 4, m // 4 * 2, m // 4 * 3, m - 1)
    return list(dict.fromkeys([-1] + [i * group_size for i in groups]))


class MetricAccumulator:
    """Per key (token count or noise index): PSNR and SSIM per image, and (with an extractor)
    streamed Inception statistics against the shared statistics of the real images."""

    def __init__(self, keys: Sequence[int], with_fid: bool):
        self.psnr = {k: [] for k in keys}
        self.ssim = {k: [] for k in keys}
        self.real = RunningStats(POOL_DIM) if with_fid else None
        self.recon = {k: RunningStats(POOL_DIM) for k in keys} if with_fid else None

    def add(self, key: int, scores: tuple, keep: np.ndarray) -> None:
        psnr, ssim, pool = scores
        self.psnr[key].append(psnr[keep])
        self.ssim[key].append(ssim[keep])
        if pool is not None:
            self.recon[key].update(pool[keep])

    def metrics(self, key: int) -> dict:
        rfid = None
        if self.recon is not None and self.real.count >= 2:
            rfid = fid_between(self.recon[key], self.real)
        return {"psnr": float(np.mean(np.concatenate(self.psnr[key]))),
                "ssim": float(np.mean(np.concatenate(self.ssim[key]))), "rfid": rfid}


def _score(evaluator: ReconstructionEvaluator, params, quant, images, t: int, extractor,
           ssim_settings) -> tuple:
    """Host (psnr, ssim, Inception pool or None) per image of the reconstruction from the first t
    tokens."""
    psnr, recon = evaluator.decode_and_score(params, quant, images, evaluator.tables.canvas[t], t)
    recon_u8 = _recon_to_uint8(recon)
    ssim = ssim_lib.ssim(*_ssim_inputs(recon_u8, images), ssim_settings)
    pool = None if extractor is None else distributed.to_host(extractor(recon_u8)["pool"])
    return distributed.to_host(psnr), distributed.to_host(ssim), pool


def evaluate_tokenizer(
    evaluator: ReconstructionEvaluator,
    params: Any,
    batches: Iterable[tuple[jax.Array, Any]],
    extractor: Callable | None = None,
    counts: Sequence[int] | None = None,
    ssim_settings: ssim_lib.SSIMSettings = ssim_lib.STANDARD,
    total: int | None = None,
    progress: bool = True,
    noise_idxs: Sequence[int] = (),
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """(curve, noisy): one row {tokens, canvas, psnr, ssim, rfid} per token count (default: every
    admissible count), and one row {noise_idx, noise_end, tokens, canvas, psnr, ssim, rfid} per
    ``noise_idxs`` entry: all N tokens decoded after the official self-correction encode with noise
    at that index (-1: clean; see ``noisy_eval_indices``), the noisy codes drawn from ``seed``.

    ``batches`` yields (images, keep): global (B, R, R, 3) arrays in [-1, 1] and a (B,) bool mask of
    the real rows (padding is dropped from every statistic); see ``padded_global_batches``. Without
    an ``extractor`` rFID is None.
    """
    tables = evaluator.tables
    cfg = evaluator.model.cfg
    n = tables.num_tokens
    counts = list(tables.token_counts if counts is None else counts)
    bad = [t for t in counts if t not in tables.canvas]
    if bad:
        raise ConfigError(
            f"token counts {bad} are not admissible; choose from {tables.token_counts}"
        )
    bad = [i for i in noise_idxs if not -1 <= i < n]
    if bad:
        raise ConfigError(f"noise indices {bad} are outside [-1, {n}): -1 is clean, else a token "
                          "position")
    spans = {i: noise_span_at(i, cfg.group_size, cfg.causal_num) for i in noise_idxs}
    curve = MetricAccumulator(counts, with_fid=extractor is not None)
    noisy = MetricAccumulator(spans, with_fid=extractor is not None)
    noisy.real = curve.real  # one set of real-image statistics for every row
    key = jax.random.key(seed)
    bar = tqdm(total=total, desc="tokenizer eval", unit="img", disable=not (progress and
               distributed.is_main_process()), dynamic_ncols=True)
    num_batches = 0
    for b, (images, keep) in enumerate(batches):
        keep = np.asarray(keep, bool)
        num_batches += 1
        quant = evaluator.encode(params, images)
        if extractor is not None:
            curve.real.update(distributed.to_host(extractor(_real_to_uint8(images))["pool"])[keep])
        score = functools.partial(_score, evaluator, params, images=images, extractor=extractor,
                                  ssim_settings=ssim_settings)
        scored = {t: score(quant, t=t) for t in counts}
        for t in counts:
            curve.add(t, scored[t], keep)
        for i, (start, end) in spans.items():
            if i < 0:  # clean: the official plain encode
                scores = scored[n] if n in scored else score(quant, t=n)
            else:
                q = evaluator.encode_noisy(params, images, np.int32(start), np.int32(end),
                                           jax.random.fold_in(jax.random.fold_in(key, b), i))
                scores = score(q, t=n)
            noisy.add(i, scores, keep)
        bar.update(int(keep.sum()))
    bar.close()
    if not num_batches:
        raise ValueError("the evaluation data yielded no images")
    curve_rows = [dict(tokens=t, canvas=tables.canvas[t], **curve.metrics(t)) for t in counts]
    noisy_rows = [dict(noise_idx=i, noise_end=end if i >= 0 else None, tokens=n,
                       canvas=tables.canvas[n], **noisy.metrics(i))
                  for i, (_, end) in spans.items()]
    return curve_rows, noisy_rows


# ---- data ----------------------------------------------------------------------------------------

def padded_global_batches(
    stream: Iterable[dict], batch_size: int, mesh, num_images: int | None = None
):
    """(global images, keep mask) from per-process pipeline batches, for ``evaluate_tokenizer``.

    A short last batch is zero-padded to the full batch on every process (one compiled shape);
    ``keep`` marks the real rows (each process's padding sits at the end of its own block) and at
    most ``num_images`` of them.
    """
    from detailflow_jax.data.global_batch import to_global

    processes = jax.process_count()
    local = batch_size // processes
    remaining = num_images
    for batch in stream:
        images = np.asarray(batch["image"])
        n_local = len(images)
        if n_local < local:
            images = np.concatenate(
                [images, np.zeros((local - n_local, *images.shape[1:]), images.dtype)]
            )
        keep = np.tile(np.arange(local) < n_local, processes)
        if remaining is not None:
            keep &= np.cumsum(keep) <= remaining
            remaining -= int(keep.sum())
        yield to_global(images, mesh), keep
        if remaining is not None and remaining <= 0:
            return


def resolve_data_config(tokenizer: str, data_config: str | ml_collections.ConfigDict | None,
                        overrides: dict) -> ml_collections.ConfigDict:
    """The data section from ``--data_config`` (FILE.py:ARG or the loaded config), else from the
    tokenizer work directory, with ``overrides``."""
    from detailflow_jax.config_lib import load_config_file
    from detailflow_jax.data.pipeline import default_data_config
    from detailflow_jax.inference.weights import is_training_workdir, workdir_config

    if data_config:
        loaded = load_config_file(data_config) if isinstance(data_config, str) else data_config
        data = loaded.data if "data" in loaded else loaded
    elif is_training_workdir(tokenizer):
        data = workdir_config(tokenizer).data
    elif overrides.get("name"):
        data = default_data_config()
    else:
        raise ConfigError(
            "say which images to evaluate on: --data_config FILE.py:ARG, or --data NAME (with "
            "--data_dir), or pass a tokenizer training work directory"
        )
    data = ml_collections.ConfigDict(data.to_dict())
    data.update({k: v for k, v in overrides.items() if v is not None})
    return data


# ---- outputs -------------------------------------------------------------------------------------

def format_table(rows: list[dict], key: str = "tokens") -> str:
    """The curve (key "tokens") or the noisy sweep (key "noise_idx", -1 = clean) as a text table."""
    def fmt(v, digits):
        return "n/a" if v is None else f"{v:.{digits}f}"

    ints = ["tokens", "canvas"] if key == "tokens" else [key, "tokens", "canvas"]
    widths = [max(6, len(c)) for c in ints]
    head = "  ".join(f"{c:>{w}}" for c, w in zip(ints, widths))
    lines = [head + f"  {'PSNR':>7}  {'SSIM':>6}  {'rFID':>8}"]
    lines += ["  ".join(f"{r[c]:{w}d}" for c, w in zip(ints, widths))
              + f"  {fmt(r['psnr'], 2):>7}  {fmt(r['ssim'], 4):>6}  {fmt(r['rfid'], 3):>8}"
              for r in rows]
    return "\n".join(lines)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / max(count - 1, 1)
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _tick_label(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 10 or v == int(v) else f"{v:.2g}"


def plot_curves(rows: list[dict], path: str, title: str = "", x_key: str = "tokens") -> None:
    """One panel per metric (PSNR, SSIM, rFID), drawn with PIL: against the token count on a log2
    axis, or (x_key "noise_idx") against the noise index on a linear axis ticked at each index."""
    log_x = x_key == "tokens"
    panels = [(m, [(r[x_key], r[m]) for r in rows if r[m] is not None]) for m in METRICS]
    panels = [(m, pts) for m, pts in panels if pts]
    width, height, margin = 380, 300, dict(left=62, right=16, top=34, bottom=48)
    canvas = Image.new("RGB", (width * len(panels), height + (24 if title else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    top_offset = 0
    if title:
        draw.text((8, 4), title, fill="black", font=font)
        top_offset = 24
    names = {"psnr": "PSNR (dB)", "ssim": "SSIM", "rfid": "rFID"}
    colours = {"psnr": (31, 119, 180), "ssim": (44, 160, 44), "rfid": (214, 39, 40)}
    tokens = [r[x_key] for r in rows]
    scale = math.log2 if log_x else float
    x_lo, x_hi = scale(min(tokens)), scale(max(tokens))
    x_hi = x_hi if x_hi > x_lo else x_lo + 1
    for i, (metric, points) in enumerate(panels):
        x0, y0 = i * width + margin["left"], top_offset + margin["top"]
        x1, y1 = (i + 1) * width - margin["right"], top_offset + height - margin["bottom"]
        values = [v for _, v in points]
        ticks = _nice_ticks(min(values), max(values))
        y_lo, y_hi = ticks[0], ticks[-1]

        def to_px(t, v):
            px = x0 + (scale(t) - x_lo) / (x_hi - x_lo) * (x1 - x0)
            py = y1 - (v - y_lo) / (y_hi - y_lo) * (y1 - y0)
            return px, py

        for v in ticks:
            _, py = to_px(min(tokens), v)
            draw.line([x0 - 4, py, x0, py], fill="black")
            draw.line([x0 + 1, py, x1 - 1, py], fill=(230, 230, 230))
            draw.text((x0 - 6, py), _tick_label(v), fill="black", font=font, anchor="rm")
        last = math.floor(scale(max(tokens)))
        x_ticks = [2 ** p for p in range(math.ceil(x_lo), last + 1)] if log_x else tokens
        for x in x_ticks:
            px, _ = to_px(x, y_lo)
            draw.line([px, y1, px, y1 + 4], fill="black")
            draw.text((px, y1 + 6), str(x), fill="black", font=font, anchor="mt")
        x_name = "tokens (log scale)" if log_x else "noise index (-1 = clean)"
        draw.text(((x0 + x1) / 2, y1 + 22), x_name, fill="black", font=font, anchor="mt")
        heading = f"{names[metric]} vs {x_name.split(' (')[0]}"
        draw.text(((x0 + x1) / 2, y0 - 8), heading, fill="black", font=font, anchor="mb")
        # after the grid lines, which would cover it
        draw.rectangle([x0, y0, x1, y1], outline="black")
        pixels = [to_px(t, v) for t, v in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colours[metric], width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colours[metric])
    storage.save_image(canvas, path)


def write_outputs(out_dir: str, rows: list[dict], settings: dict, note: str,
                  noisy: list[dict] = ()) -> dict[str, str]:
    """tokenizer_eval.json (settings, curve, noisy), tokenizer_curve.png and, with a sweep,
    tokenizer_noisy.png."""
    out = storage.prepare_dir(out_dir)
    paths = {
        "json": os.fspath(out / "tokenizer_eval.json"),
        "png": os.fspath(out / "tokenizer_curve.png"),
    }
    storage.write_json(
        paths["json"],
        {"settings": settings, "ssim_note": note, "curve": rows, "noisy": list(noisy)},
    )
    title = f"{settings.get('tokenizer', '')}  ({settings.get('num_images')} images)"
    plot_curves(rows, paths["png"], title=title)
    if noisy:
        paths["noisy_png"] = os.fspath(out / "tokenizer_noisy.png")
        plot_curves(noisy, paths["noisy_png"], title=f"{title}, all {noisy[0]['tokens']} tokens",
                    x_key="noise_idx")
    return paths


# ---- command -------------------------------------------------------------------------------------

def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("tokenizer", None, "tokenizer training work directory or converted "
                        "directory", flag_values=fv, required=True)
    cli.define_tokenizer_config(fv)
    flags.DEFINE_enum("rounding", None, ["ceil", "nearest"], "decoder canvas rounding (default: "
                      "the work directory's, else ceil as the official code)", flag_values=fv)
    _define_data_flags(fv)
    cli_flags.define_inception(fv, "omit: no rFID")
    cli_flags.define_preprocess(fv, "adm")
    cli.define_out(fv, "output directory")
    flags.DEFINE_integer("num_images", None, "evaluate the first N images (default: the whole "
                         "split)", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "global batch (a multiple of the devices)",
                         flag_values=fv)
    flags.DEFINE_string("token_counts", None, "comma-separated token counts (default: every "
                        "admissible count)", flag_values=fv)
    flags.DEFINE_bool("official_ssim", False, "SSIM as the official script computes it (skimage "
                      "defaults, data_range=2.0)", flag_values=fv)
    flags.DEFINE_bool("noisy_eval", False, "also the official robustness sweep: all N tokens after "
                      "noise at token index -1 (clean), 0, g*M/4, g*M/2, g*3M/4, g*(M-1) (M = N/g "
                      "groups); about 2 encoder passes and a full decode per index and image "
                      "(skipped for a tokenizer trained without self-correction)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the noisy codes of --noisy_eval", flag_values=fv)


def _define_data_flags(fv: flags.FlagValues) -> None:
    """Where the evaluation images come from: a config's data section and single overrides."""
    cli.define_config(fv, "data_config", help=cli.CONFIG_HELP + " whose data section describes "
                      "the evaluation images; override fields with --data_config.data.key=value")
    flags.DEFINE_string("data", None, "override data.name (synthetic, fashion_mnist, imagefolder)",
                        flag_values=fv)
    flags.DEFINE_string("data_dir", None, "override data.data_dir", flag_values=fv)
    flags.DEFINE_string("eval_split", None, "override data.eval_split (default: val / test)",
                        flag_values=fv)
    flags.DEFINE_integer("image_size", None, "override data.image_size (must equal the "
                         "tokenizer's)", flag_values=fv)


def parse_args(argv: list[str] | None) -> flags.FlagValues:
    """The flags; ``--no-noisy_eval`` (argparse's spelling) still works."""
    return cli.parse(argv, __doc__, _define_flags, {"no-noisy_eval": "nonoisy_eval"})


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from detailflow_jax.convert.inception import load_inception_params
    from detailflow_jax.data.pipeline import make_eval_iter
    from detailflow_jax.nn.inception import InceptionFeatures
    from detailflow_jax.tokenizer.resolution import ResolutionTables
    from detailflow_jax.inference.weights import is_training_workdir, load_tokenizer, workdir_config

    distributed.maybe_initialize()
    mesh = sharding.make_mesh((-1, 1, 1))
    model_cfg, params = load_tokenizer(args.tokenizer, mesh, args.tokenizer_config)
    data_cfg = resolve_data_config(
        args.tokenizer,
        cli.loaded_config(args, "data_config"),
        dict(
            name=args.data,
            data_dir=args.data_dir,
            eval_split=args.eval_split,
            image_size=args.image_size,
        ),
    )
    if data_cfg.image_size != model_cfg.image_size:
        raise ConfigError(
            f"data.image_size={data_cfg.image_size} differs from the tokenizer's image_size="
            f"{model_cfg.image_size}; pass --image_size {model_cfg.image_size}"
        )
    rounding = args.rounding or (workdir_config(args.tokenizer).get("rounding", "ceil")
                                 if is_training_workdir(args.tokenizer) else "ceil")
    evaluator = ReconstructionEvaluator(
        model_cfg, ResolutionTables.from_model_config(model_cfg, rounding)
    )
    counts = [int(t) for t in args.token_counts.split(",")] if args.token_counts else None
    noise_idxs = []
    if args.noisy_eval:
        noise_idxs = noisy_eval_indices(model_cfg.num_latent_tokens, model_cfg.group_size)
    trained_clean = is_training_workdir(args.tokenizer) and not workdir_config(args.tokenizer).get(
        "self_correction", True)
    if noise_idxs and trained_clean:  # the official script turns the sweep off for these too
        print("--noisy_eval skipped: this tokenizer was trained without self-correction")
        noise_idxs = []
    extractor = None
    if args.inception:
        extractor = InceptionFeatures(
            load_inception_params(args.inception), mesh=mesh, preprocess=args.preprocess
        )
    ssim_settings = ssim_lib.OFFICIAL if args.official_ssim else ssim_lib.STANDARD
    note = OFFICIAL_SSIM_NOTE if args.official_ssim else STANDARD_SSIM_NOTE

    stream = make_eval_iter(data_cfg, args.batch_size, drop_remainder=False)
    total = (
        stream.num_examples
        if args.num_images is None
        else min(args.num_images, stream.num_examples)
    )
    start = time.perf_counter()
    batches = padded_global_batches(stream, args.batch_size, mesh, args.num_images)
    rows, noisy = evaluate_tokenizer(evaluator, params, batches, extractor, counts, ssim_settings,
                                     total=total, noise_idxs=noise_idxs, seed=args.seed)
    seconds = time.perf_counter() - start
    stream.close()
    settings = dict(
        tokenizer=args.tokenizer,
        tokenizer_config=args.tokenizer_config,
        rounding=rounding,
        data=data_cfg.to_dict(),
        num_images=total,
        batch_size=args.batch_size,
        inception=args.inception,
        preprocess=args.preprocess,
        official_ssim=args.official_ssim,
        noisy_eval=bool(noise_idxs),
        seed=args.seed,
        seconds=seconds,
        devices=jax.device_count(),
    )
    if distributed.is_main_process():
        paths = write_outputs(args.out, rows, settings, note, noisy)
        print(format_table(rows))
        if noisy:
            print(f"noisy eval (all {noisy[0]['tokens']} tokens, noise at noise_idx; -1 = clean):")
            print(format_table(noisy, key="noise_idx"))
        print(note)
        if extractor is None:
            print("rFID skipped: pass --inception to compute it")
        print(f"{total} images in {seconds:.1f} s; wrote {', '.join(paths.values())}")
    return rows, noisy


if __name__ == "__main__":
    cli_errors.run(main)
