r"""Generation evaluation: sample K images, pack them as an ADM ``.npz`` and score them (IS, FID,
sFID, precision, recall) against an ADM reference batch, in one resumable run.

    python -m detailflow_jax.eval.evaluate --gpt workdir/ar --inception INCEPTION \
        --reference VIRTUAL_imagenet256_labeled.npz --out DIR [--num_samples 50000] [--labels random|per_class] \
        [--cfg_scale 1.45 --top_k 0 --top_p 1.0 --temperature 1.0 --seed 0 --batch_size 256]
    python -m detailflow_jax.eval.evaluate --gpt /ckpt/gpt_l_128 --gpt_config configs/gpt.py:L/128 \
        --tokenizer /ckpt/df16 --tokenizer_config configs/tokenizer.py:DF-16 --inception INCEPTION \
        --reference VIRTUAL_imagenet256_labeled.npz --out DIR --cfg_scale 1.45

``--gpt`` / ``--tokenizer`` take training work directories or converted parameter directories,
loaded as ``eval/sample.py`` does (``load_generator``; sampling settings default to the GPT config's
``sampling`` section). ``INCEPTION`` is the orbax directory of ``python -m
detailflow_jax.convert.inception`` or the pytorch-fid ``.pth``.

Labels: ``random`` draws K labels uniformly (the official DetailFlow/LlamaGen protocol,
docs/fidelity.md#evaluation); ``per_class`` gives every class K / num_classes samples (VAR, MAR,
TiTok; 50 per class at K = 50,000), interleaved (0, 1, ..., 999, 0, 1, ...) so that each
Inception-Score split of 5,000 sees every class equally often.

Resumable: images are generated in chunks of ``--chunk_size``; each finished chunk is written
atomically to ``DIR/chunks/chunk_{i:05d}.npz`` (images + labels). Rerunning the command skips
finished chunks. The label list comes from the seed alone and chunk i samples with
``fold_in(key(seed), i)`` (batch j inside it with a further ``fold_in(., j)``), so a resumed run
writes exactly the images of an uninterrupted one. Generation settings are recorded in
``DIR/settings.json``; a rerun with different ones is refused rather than mixing two sample sets.

Outputs: ``DIR/samples_<K>.npz`` (``arr_0``: uint8 (K, R, R, 3), the ADM evaluator's input;
``labels``: (K,)) and ``DIR/results.json`` (settings, metrics, throughput). Several processes
(``jax.distributed``) each feed their devices' share of every batch; process 0 writes chunks and
computes the metrics on its local devices.

The numbers use our JAX port of the FID Inception with the ADM preprocessing; publish numbers from
the TF ADM evaluator run on ``samples_<K>.npz`` (docs/recipes.md#reproducing-the-tables).
"""  # noqa: E501

from __future__ import annotations

import dataclasses
import os
import time
import zipfile
from typing import Callable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from absl import flags
from etils import epath

from detailflow_jax import cli, cli_errors, distributed, sharding, storage
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.eval import cli_flags
from detailflow_jax.eval.fid import evaluate_samples
from detailflow_jax.nn.inception import InceptionFeatures
from detailflow_jax.eval.reference_stats import iter_images

LABEL_MODES = ("random", "per_class")
# (labels (B,) int32 numpy, key) -> uint8 images (B, R, R, 3) numpy, the same on every process.
GenerateFn = Callable[[np.ndarray, jax.Array], np.ndarray]


def make_labels(num_samples: int, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """The run's full label list; depends only on its arguments.

    ``per_class``: class c at positions c, c + C, c + 2C, ... (exactly K / C each when C divides K,
    otherwise the counts differ by at most one). ``random``: uniform i.i.d. draws seeded by
    ``seed``.
    """
    if num_samples < 1 or num_classes < 1:
        raise ValueError(
            f"need num_samples >= 1 and num_classes >= 1, got {num_samples} and {num_classes}"
        )
    if mode == "per_class":
        return (np.arange(num_samples) % num_classes).astype(np.int32)
    if mode == "random":
        return np.random.default_rng(seed).integers(0, num_classes, num_samples).astype(np.int32)
    raise ValueError(f"label mode {mode!r}: use one of {LABEL_MODES}")


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """How the K samples split into chunks (the unit of resumption) and batches (the unit of
    generation)."""

    num_samples: int
    chunk_size: int
    batch_size: int
    seed: int

    def __post_init__(self):
        if self.batch_size < 1 or self.chunk_size < 1 or self.chunk_size % self.batch_size:
            raise ValueError(
                f"chunk_size={self.chunk_size} must be a positive multiple of batch_size="
                f"{self.batch_size}"
            )

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)

    def key(self, chunk: int, batch: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), chunk), batch)


def chunk_path(out_dir: str, chunk: int) -> epath.Path:
    return storage.path(out_dir) / "chunks" / f"chunk_{chunk:05d}.npz"


def _atomic_savez(path: epath.Path, **arrays) -> None:
    with storage.written_whole(path) as tmp:
        storage.save_npz(tmp, **arrays)


def _chunk_is_done(path: str, labels: np.ndarray) -> bool:
    """A chunk counts as done when its file holds exactly the expected labels (else it is
    regenerated). Chunks are written whole and atomically, so the images need not be read here."""
    if not path.exists():
        return False
    try:
        return np.array_equal(storage.load_npz(path)["labels"], labels)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def _same_on_all_processes(marks: np.ndarray) -> np.ndarray:
    """Process 0's view (it owns DIR) for everybody, so all processes run the same collective
    batches."""
    if jax.process_count() == 1:
        return marks
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(marks))


def generate_chunks(generate: GenerateFn, plan: ChunkPlan, labels: np.ndarray, out_dir: str,
                    stop_after_chunks: int | None = None) -> dict:
    """Generates every missing chunk; returns {"generated": images made now, "seconds": wall time,
    "complete"}.

    ``stop_after_chunks`` stops after that many newly generated chunks, as an interruption would
    (for tests).
    """
    (storage.prepare_dir(out_dir) / "chunks").mkdir(exist_ok=True)
    expected = [labels[slice(*plan.bounds(i))] for i in range(plan.num_chunks)]
    done = _same_on_all_processes(np.array([_chunk_is_done(chunk_path(out_dir, i), expected[i])
                                            for i in range(plan.num_chunks)]))
    initial = sum(len(expected[i]) for i in range(plan.num_chunks) if done[i])
    main = distributed.is_main_process()
    bar = tqdm(
        total=plan.num_samples,
        initial=initial,
        desc="sampling",
        unit="img",
        disable=not main,
        dynamic_ncols=True,
    )
    generated, new_chunks, stopped, start_time = 0, 0, False, time.perf_counter()
    for chunk in range(plan.num_chunks):
        if done[chunk]:
            continue
        if stop_after_chunks is not None and new_chunks >= stop_after_chunks:
            stopped = True
            break
        chunk_labels = expected[chunk]
        images = []
        for b, start in enumerate(range(0, len(chunk_labels), plan.batch_size)):
            batch = chunk_labels[start:start + plan.batch_size]
            n = len(batch)
            # Pad the short last batch so every call has one shape (one compilation).
            padded = np.concatenate([batch, np.zeros(plan.batch_size - n, np.int32)])
            images.append(np.asarray(generate(padded, plan.key(chunk, b)))[:n])
            generated += n
            bar.update(n)
            bar.set_postfix(
                images_per_s=f"{generated / (time.perf_counter() - start_time):.2f}", refresh=False
            )
        if main:
            _atomic_savez(
                chunk_path(out_dir, chunk), images=np.concatenate(images), labels=chunk_labels
            )
        new_chunks += 1
    bar.close()
    return {
        "generated": generated,
        "seconds": time.perf_counter() - start_time,
        "complete": not stopped,
    }


def iter_chunk_images(out_dir: str, plan: ChunkPlan) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of every chunk, in order."""
    for chunk in range(plan.num_chunks):
        data = storage.load_npz(chunk_path(out_dir, chunk))
        yield data["images"], data["labels"]


def _write_npy_header(f, shape: tuple[int, ...], dtype) -> None:
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": shape,
    }
    np.lib.format.write_array_header_1_0(f, header)


def write_adm_npz(path: str, out_dir: str, plan: ChunkPlan) -> tuple[int, ...]:
    """Packs the chunks into one ADM-format npz (``arr_0`` uint8 (K, R, R, 3), ``labels`` (K,)),
    streamed chunk by chunk (50k images at 256 px are 9.8 GB) and written atomically. Returns the
    shape of ``arr_0``."""
    image_shape = storage.load_npz(chunk_path(out_dir, 0))["images"].shape[1:]
    shape = (plan.num_samples, *image_shape)
    labels = []
    with storage.written_whole(path) as tmp, tmp.open("wb") as out, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        # zip64: the size is unknown up front
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            _write_npy_header(f, shape, np.uint8)
            for images, chunk_labels in iter_chunk_images(out_dir, plan):
                if images.shape[1:] != image_shape or images.dtype != np.uint8:
                    raise ValueError(
                        f"chunk images {images.dtype} {images.shape} differ from {image_shape} "
                        "uint8"
                    )
                f.write(np.ascontiguousarray(images).tobytes())
                labels.append(chunk_labels)
        with zf.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.concatenate(labels))
    return shape


class ResumeError(ValueError):
    """The output directory holds samples made with other generation settings."""


# Settings that decide which images are generated: a resumed run must match them exactly.
GENERATION_KEYS = (
    "tokenizer",
    "gpt",
    "ema",
    "dtype",
    "num_samples",
    "label_mode",
    "num_classes",
    "seed",
    "batch_size",
    "chunk_size",
    "cfg_scale",
    "cfg_schedule",
    "cfg_interval",
    "top_k",
    "top_p",
    "temperature",
)


def check_settings(out_dir: str, settings: dict) -> None:
    """Writes DIR/settings.json on the first run; refuses to resume when a generation setting
    changed."""
    path = storage.path(out_dir) / "settings.json"
    if path.exists():
        previous = storage.read_json(path)
        changed = {
            k: (previous.get(k), settings.get(k))
            for k in GENERATION_KEYS
            if previous.get(k) != settings.get(k)
        }
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ResumeError(
                f"{out_dir} holds samples generated with other settings ({details}); use another "
                "--out "
                "or delete its chunks/ and settings.json to start over"
            )
    elif distributed.is_main_process():
        storage.prepare_dir(out_dir)
        storage.write_json(path, {k: settings[k] for k in GENERATION_KEYS})


def run_evaluation(
    generate: GenerateFn,
    extractor: Callable | None,
    settings: dict,
    out_dir: str,
    stop_after_chunks: int | None = None,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Generates (or resumes) the samples, writes the ADM npz and ``results.json``; returns the
    results (None when stopped early, and on processes other than 0). ``settings`` holds the
    GENERATION_KEYS plus ``reference`` and ``inception_batch_size`` (and anything else worth
    recording). Without an ``extractor`` only the npz is written (e.g. for the TF ADM evaluator)."""
    check_settings(out_dir, settings)
    plan = ChunkPlan(
        settings["num_samples"], settings["chunk_size"], settings["batch_size"], settings["seed"]
    )
    labels = make_labels(
        settings["num_samples"], settings["num_classes"], settings["label_mode"], settings["seed"]
    )
    gen = generate_chunks(generate, plan, labels, out_dir, stop_after_chunks)
    if not gen["complete"]:
        log(f"stopped after {stop_after_chunks} new chunk(s); rerun the same command to continue")
        return None
    if not distributed.is_main_process():
        _wait_for_main()
        return None

    npz_path = os.fspath(storage.path(out_dir) / f"samples_{plan.num_samples}.npz")
    shape = write_adm_npz(npz_path, out_dir, plan)
    results = {
        "settings": settings,
        "samples_npz": npz_path,
        "samples_shape": list(shape),
        "metrics": None,
        # wall clock including compilation; sampling counts only the chunks made by this run
        "throughput": {
            "sampled_this_run": gen["generated"],
            "sampling_images_per_s": gen["generated"] / gen["seconds"]
            if gen["generated"]
            else None,
        },
    }
    if extractor is not None:
        batch = settings["inception_batch_size"]
        timings: dict = {}
        start = time.perf_counter()
        results["metrics"] = evaluate_samples(
            iter_images(npz_path, batch),
            extractor,
            settings["reference"],
            batch,
            total=plan.num_samples,
            log=log,
            timings=timings,
        )
        results["throughput"].update(
            inception_images_per_s=plan.num_samples / timings["samples_seconds"],
            metrics_seconds=time.perf_counter() - start,
        )
    storage.write_json(storage.path(out_dir) / "results.json", results)
    log(format_results(results))
    if jax.process_count() > 1:
        _wait_for_main()
    return results


def _wait_for_main() -> None:
    """Keeps the other processes alive until process 0 has computed the metrics on its own
    devices."""
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("detailflow_jax.eval.evaluate: metrics done")


def format_results(results: dict) -> str:
    s, m, t = results["settings"], results["metrics"], results["throughput"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    mode = (
        "uniform random, the official DetailFlow protocol"
        if s["label_mode"] == "random"
        else "balanced per class"
    )
    lines = [
        f"{s['num_samples']} samples -> {results['samples_npz']}; labels: {s['label_mode']} ({mode}"
        "); "
        f"CFG {s['cfg_scale']} ({s['cfg_schedule']}), top-k {s['top_k']}, top-p {s['top_p']}, "
        f"temperature {s['temperature']}, seed {s['seed']}",
        "metrics skipped (--no_metrics)"
        if m is None
        else f"IS {fmt(m['inception_score'])}  FID {fmt(m['fid'])}  sFID {fmt(m['sfid'])}  "
        f"precision {fmt(m['precision'])}  recall {fmt(m['recall'])}",
    ]
    if t["sampling_images_per_s"]:
        lines.append(f"sampling {t['sampling_images_per_s']:.2f} images/s")
    if "inception_images_per_s" in t:
        lines.append(f"Inception {t['inception_images_per_s']:.2f} images/s")
    return "\n".join(lines)


def inception_extractor(path: str, preprocess: str = "adm") -> InceptionFeatures:
    """The FID Inception on this process's devices (process 0 computes the metrics alone)."""
    from detailflow_jax.convert.inception import load_inception_params
    mesh = sharding.make_mesh((-1, 1, 1), devices=jax.local_devices())
    return InceptionFeatures(load_inception_params(path), mesh=mesh, preprocess=preprocess)


def _define_flags(fv: flags.FlagValues) -> None:
    cli_flags.define_generator(fv)
    cli_flags.define_inception(fv)
    flags.DEFINE_string("reference", None, "ADM reference batch, e.g. "
                        "VIRTUAL_imagenet256_labeled.npz", flag_values=fv)
    flags.DEFINE_bool("no_metrics", False, "only write the samples npz (e.g. for the TF ADM "
                      "evaluator); --inception/--reference unused", flag_values=fv)
    cli.define_out(fv, "output directory (reused to resume)")
    flags.DEFINE_integer("num_samples", 50_000, "images to generate and score", flag_values=fv)
    flags.DEFINE_enum("labels", "random", list(LABEL_MODES), "random: uniform labels (official "
                      "DetailFlow protocol); per_class: K / num_classes each", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=fv)
    flags.DEFINE_integer("batch_size", 256, "global sampling batch (rounded up to a multiple of "
                         "the data-parallel devices)", flag_values=fv)
    flags.DEFINE_integer("chunk_size", 0, "images per resumable chunk (default: about 1000, a "
                         "multiple of the batch size)", flag_values=fv)
    flags.DEFINE_integer("inception_batch_size", 200, "Inception batch", flag_values=fv)
    cli_flags.define_preprocess(fv, "adm")
    cli.define_hidden_integer(fv, "stop_after_chunks")  # tests: simulate an interruption


def parse_args(argv: list[str] | None) -> flags.FlagValues:
    args = cli.parse(argv, __doc__, _define_flags)
    if not args.no_metrics and not (args.inception and args.reference):
        raise ConfigError("--inception and --reference are required (or pass --no_metrics to only "
                          "write the samples)")
    if args.reference and not storage.path(args.reference).is_file():
        raise ConfigError(f"--reference {args.reference} does not exist")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    from detailflow_jax import sharding
    from detailflow_jax.eval.sample import load_generator

    distributed.maybe_initialize()
    mesh = sharding.make_mesh((-1, 1, 1))
    generator, _ = load_generator(
        args.gpt,
        mesh,
        args.tokenizer,
        args.gpt_config,
        args.tokenizer_config,
        not args.no_ema,
        args.dtype,
        **cli_flags.sampling_overrides(args),
    )
    batch_size = sharding.round_up(args.batch_size, generator.data_parallelism)
    chunk_size = sharding.round_up(args.chunk_size or 1000, batch_size)
    sampling = {
        k: getattr(generator.settings, k)
        for k in ("cfg_scale", "cfg_schedule", "cfg_interval", "top_k", "top_p", "temperature")
    }
    settings = dict(
        tokenizer=args.tokenizer or "(the GPT work directory's)",
        tokenizer_config=args.tokenizer_config,
        gpt=args.gpt,
        gpt_config=args.gpt_config,
        ema=not args.no_ema,
        dtype=args.dtype,
        num_samples=args.num_samples,
        label_mode=args.labels,
        num_classes=generator.gpt_cfg.num_classes,
        seed=args.seed,
        batch_size=batch_size,
        chunk_size=chunk_size,
        **sampling,
        inception=args.inception,
        preprocess=args.preprocess,
        reference=args.reference,
        inception_batch_size=args.inception_batch_size,
        devices=jax.device_count(),
        processes=jax.process_count(),
    )
    check_settings(args.out, settings)  # before loading the Inception: a refused resume fails fast
    with_metrics = not args.no_metrics and distributed.is_main_process()
    extractor = inception_extractor(args.inception, args.preprocess) if with_metrics else None
    return run_evaluation(generator.generate, extractor, settings, args.out, args.stop_after_chunks)


if __name__ == "__main__":
    cli_errors.run(main)
