"""The main job: Fashion-MNIST from images to generated images, coarse to fine, on one machine.

    python -m detailflow_jax.quickstart --workdir workdir/fashion_mnist      (launch/quickstart.sh installs first)

Stages, each resumable (a rerun skips finished stages and continues an interrupted one from its
checkpoint; a stage whose settings or inputs changed runs again, see ``Stages``):
  1. tokenizer   train the DetailFlow tokenizer (configs/tokenizer_fashion_mnist.py)      -> tokenizer/
  2. codes       extract codes + self-correction triples of the training images          -> codes/
  3. gpt         train the class-conditional group-parallel GPT (configs/ar_fashion_mnist.py) -> gpt/
  4. samples     class-conditional samples (rows = classes) and a coarse-to-fine strip  -> samples/
  5. quality     a Fashion-MNIST classifier scores GPT samples, tokenizer reconstructions and an untrained GPT
                 (accuracy w.r.t. the requested class, Fréchet distance of classifier features) -> quality.json
Wall time per stage goes to timings.json.
"""  # noqa: E501

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import numpy as np
from absl import flags
from absl import logging as absl_logging

from configs import ar_fashion_mnist, tokenizer_fashion_mnist
from detailflow_jax import sharding, storage
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.eval import classifier, quality
from detailflow_jax.eval.sample import load_generator, sample
from detailflow_jax.inference.reconstruction import ReconstructionEvaluator
from detailflow_jax.inference.weights import load_tokenizer
from detailflow_jax.tokenizer.extract import extract_codes
from detailflow_jax.train import ar as ar_train
from detailflow_jax.train import cli as train_cli
from detailflow_jax.train import tokenizer as tokenizer_train
from detailflow_jax.train.ar_step import make_ar_step

# --smoke: workdir/fashion_mnist_smoke (other models: never mixed)
DEFAULT_WORKDIR = "workdir/fashion_mnist"
_TOKENIZER_STEPS = flags.DEFINE_integer(
    "tokenizer_steps", 0, "tokenizer training steps (0: the recipe's)"
)
_GPT_STEPS = flags.DEFINE_integer("gpt_steps", 0, "GPT training steps (0: the recipe's)")
_EXTRACT_IMAGES = flags.DEFINE_integer(
    "extract_images", 0, "training images to extract codes from (0: the recipe's)"
)
_QUALITY_SAMPLES = flags.DEFINE_integer(
    "quality_samples", 1000, "generated images scored by the quality check"
)
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "tiny models on synthetic data (a test of the plumbing, not of quality)"
)


def fingerprint(*parts) -> str:
    """A short hash of what a stage's result depends on (configs as their JSON, other JSON-able
    values)."""
    text = json.dumps(
        [p.to_json(sort_keys=True) if hasattr(p, "to_json") else p for p in parts], sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Stages:
    """Runs named stages once. ``.done/<name>`` records the fingerprints of the stage's settings and
    of its inputs (the results of the stages before it) when it starts, and its wall time when it
    ends: a finished stage with the same fingerprints is skipped, otherwise it runs again (a trainer
    resumes from its checkpoint)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.done_dir = storage.path(workdir) / ".done"
        self.done_dir.mkdir(parents=True, exist_ok=True)

    def _marker(self, name: str) -> dict | None:
        path = self.done_dir / name
        try:
            marker = json.loads(path.read_text()) if path.exists() else None
        except ValueError:  # the wall time alone, written before markers held fingerprints
            return None
        return marker if isinstance(marker, dict) else None

    def run(
        self, name: str, fn, settings: str, inputs: str = "", trained: str | None = None
    ) -> tuple[float, str]:
        """(wall time, this result's fingerprint). ``trained``: the stage's output directory when a
        rerun would continue from it (a trainer's checkpoints); if it exists and the stage's inputs
        changed, the stage is refused rather than continued from a result made of other inputs."""
        key = {"settings": settings, "inputs": inputs}
        result = fingerprint(key)
        marker = self._marker(name)
        if (
            marker is not None
            and {k: marker.get(k) for k in key} == key
            and marker.get("seconds") is not None
        ):
            print(
                f"== {name}: done already ({marker['seconds']:.0f} s, same settings and inputs), "
                "skipped",
                flush=True,
            )
            return marker["seconds"], result
        if (
            marker is not None
            and marker.get("inputs") != inputs
            and trained
            and storage.path(trained).exists()
        ):
            raise ConfigError(
                f"the inputs of the {name} stage changed since it ran (fingerprint "
                f"{marker.get('inputs')} -> {inputs}, e.g. the stage before it ran with other "
                f"settings): {trained} was trained on the old ones; delete it to train again on "
                "the "
                "new ones, or pass another --workdir"
            )
        if marker is not None and {k: marker.get(k) for k in key} != key:
            print(
                f"== {name}: settings or inputs changed since it ran (settings "
                f"{marker.get('settings')} -> "
                f"{settings}, inputs {marker.get('inputs')} -> {inputs}); running it again",
                flush=True,
            )
        print(f"== {name}", flush=True)
        (self.done_dir / name).write_text(json.dumps({**key, "seconds": None}))
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        (self.done_dir / name).write_text(json.dumps({**key, "seconds": round(seconds, 1)}))
        print(f"== {name}: {seconds:.0f} s", flush=True)
        return seconds, result


def configs(
    workdir: str, smoke: bool, tokenizer_steps: int = 0, gpt_steps: int = 0, extract_images: int = 0
):
    """The two recipes (configs/tokenizer_fashion_mnist.py, configs/ar_fashion_mnist.py) wired to
    ``workdir``."""
    tok = tokenizer_fashion_mnist.get_config("smoke" if smoke else None)
    ar = ar_fashion_mnist.get_config("smoke" if smoke else None)
    if tokenizer_steps:
        tok.total_steps = tokenizer_steps
    if gpt_steps:
        ar.total_steps = gpt_steps
    if extract_images:
        ar.extract.max_images = extract_images
    ar.codes_dir = os.fspath(storage.path(workdir) / "codes")
    ar.tokenizer = os.fspath(storage.path(workdir) / "tokenizer")
    return tok, ar


def quality_stage(workdir: str, tok_cfg, ar_cfg, smoke: bool, num_samples: int) -> dict:
    """Classifier accuracy and Fréchet distance for GPT samples, tokenizer reconstructions and an
    untrained GPT."""
    data_cfg = classifier.fashion_mnist_config()
    # plumbing only: a short classifier on the synthetic images the smoke models were trained on
    if smoke:
        data_cfg = tok_cfg.data
    params, info = classifier.load_or_train_classifier(
        workdir, data_cfg, steps=50 if smoke else 1000
    )
    test_images, test_labels = classifier.load_split(data_cfg, data_cfg.eval_split or "test")
    (_, _), (held_images, held_labels) = quality.split_real(test_images, test_labels)

    mesh = sharding.make_mesh((-1, 1, 1))
    tok_model_cfg, tok_params = load_tokenizer(ar_cfg.tokenizer, mesh)
    evaluator = ReconstructionEvaluator(tok_model_cfg)
    recon, batch = [], 100 * jax.device_count()
    for start in range(0, len(held_images), batch):
        chunk = held_images[start:start + batch]
        pad = (-len(chunk)) % jax.device_count()
        x = np.concatenate([chunk, chunk[:pad]]).astype(np.float32) / 127.5 - 1.0
        out = evaluator.reconstruct(tok_params, jax.device_put(x, sharding.batch_sharding(mesh, 4)),
                                    evaluator.tables.num_tokens)
        recon.append(np.asarray(out)[:len(chunk)])
    recon = np.concatenate(recon)

    generator, _ = load_generator(os.fspath(storage.path(workdir) / "gpt"), mesh)
    num_classes = generator.gpt_cfg.num_classes
    k = max(num_samples // num_classes, 1) * num_classes
    labels = np.tile(np.arange(num_classes, dtype=np.int32), k // num_classes)
    batch = sharding.round_up(min(k, 100), generator.data_parallelism)  # the last batch is padded
    key = jax.random.key(1234)
    trained = generator.many(labels, key, batch)
    untrained_params = make_ar_step(ar_cfg, mesh).init(ar_cfg.seed + 1)
    untrained = generator.in_batches(
        labels,
        batch,
        lambda b, i: generator.generate(b, jax.random.fold_in(key, i), untrained_params["params"]),
    )
    return quality.quality_report(
        params,
        {
            "GPT samples": (trained, labels),
            "tokenizer reconstructions (all tokens)": (recon, held_labels),
            "untrained GPT samples": (untrained, labels),
        },
        test_images,
        test_labels,
        classifier_accuracy=info["test_accuracy"],
        path=storage.path(workdir) / "quality.json",
    )


def train_to_end(name: str, train_fn, config, workdir: str) -> None:
    """Runs a trainer; a run stopped early (SIGTERM: it saved a checkpoint) ends the job instead of
    moving on."""
    out = train_fn(config, workdir)
    state = out[0] if isinstance(out, tuple) else out
    if int(state["step"]) < config.total_steps:
        raise SystemExit(
            f"{name} training stopped at step {int(state['step'])} of {config.total_steps} "
            "(checkpoint "
            "saved); run the same command again to resume"
        )


def run_main_job(workdir: str, smoke: bool = False, tokenizer_steps: int = 0, gpt_steps: int = 0,
                 extract_images: int = 0, quality_samples: int = 1000) -> dict:
    """Runs (or resumes) every stage; returns the wall time per stage in seconds."""
    work = storage.prepare_dir(workdir)
    tok_cfg, ar_cfg = configs(workdir, smoke, tokenizer_steps, gpt_steps, extract_images)
    stages = Stages(workdir)
    timings = {}
    timings["tokenizer"], tok_fp = stages.run(
        "tokenizer",
        lambda: train_to_end("tokenizer", tokenizer_train.train, tok_cfg, ar_cfg.tokenizer),
        fingerprint(tok_cfg),
    )
    timings["codes"], codes_fp = stages.run(  # overwrite: codes of an older tokenizer are replaced
        "codes", lambda: extract_codes(ar_cfg, ar_cfg.tokenizer, ar_cfg.codes_dir, overwrite=True),
        fingerprint(ar_cfg.extract), tok_fp)
    gpt_dir, samples_dir = os.fspath(work / "gpt"), os.fspath(work / "samples")
    timings["gpt"], gpt_fp = stages.run(
        "gpt",
        lambda: train_to_end("GPT", ar_train.train, ar_cfg, gpt_dir),
        fingerprint(ar_cfg),
        codes_fp,
        trained=gpt_dir,
    )
    timings["samples"], _ = stages.run(
        "samples",
        lambda: sample(gpt_dir, samples_dir, num_per_class=10),
        fingerprint("num_per_class=10"),
        gpt_fp,
    )
    timings["quality"], _ = stages.run(
        "quality", lambda: quality_stage(workdir, tok_cfg, ar_cfg, smoke, quality_samples),
        fingerprint(smoke, quality_samples), fingerprint(tok_fp, gpt_fp))
    timings["total"] = sum(timings.values())
    storage.write_json(work / "timings.json", timings)
    return timings


def main(argv) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save through absl at INFO
    default = DEFAULT_WORKDIR + ("_smoke" if _SMOKE.value else "")
    # --workdir is defined by train.cli
    workdir = os.fspath(storage.path(flags.FLAGS.workdir or default))
    timings = run_main_job(workdir, _SMOKE.value, _TOKENIZER_STEPS.value, _GPT_STEPS.value,
                           _EXTRACT_IMAGES.value, _QUALITY_SAMPLES.value)
    report = storage.path(workdir) / "quality.json"
    if report.exists():
        print(quality.format_table(storage.read_json(report)))
    print("\nwall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"\nresults in {workdir}:")
    for path, what in (
        ("samples/samples.png", "class-conditional samples (rows = classes)"),
        (
            "samples/coarse_to_fine.png",
            "coarse-to-fine: one sample per class from its first t tokens",
        ),
        ("samples/samples.gif", "the sample grid refining as tokens arrive"),
        ("tokenizer/images", "tokenizer reconstructions and coarse-to-fine strips during training"),
        ("tokenizer/reconstruction_psnr.json", "tokenizer PSNR per token count"),
        ("quality.json", "the quality table"),
        ("timings.json", "wall time per stage"),
        ("tokenizer/checkpoints", "checkpoints"),
        ("gpt/checkpoints", "checkpoints"),
        ("tokenizer/metrics.jsonl", "training metrics (also gpt/metrics.jsonl, TensorBoard)"),
    ):
        print(f"  {os.fspath(storage.path(workdir) / path):<60} {what}")


if __name__ == "__main__":
    train_cli.run(main, ("workdir",))
