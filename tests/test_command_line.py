"""Every command reads its command line the same way (absl flags, ``detailflow_jax.cli``):
``--help`` lists its flags and ``--verbose``, a flag shared by several commands has one help text,
and bad input ends with one line ``error: ...`` and exit status 2. Commands with their own flag set
(``cli.parse``) are called in-process; the trainer-style ones (absl's global FLAGS) in a
subprocess."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
from absl import flags

from detailflow_jax import cli
from detailflow_jax.cli_errors import EXIT_STATUS, VERBOSE_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module -> (flags its --help must list, a bad command line, a fragment of its error line)
OWN_FLAG_SET = {
    "detailflow_jax.convert.inception": (("checkpoint", "out", "force"), (), "--checkpoint"),
    "detailflow_jax.convert.dino": (("backbone", "heads", "out", "force"), ("--out=x",),
                                    "--backbone"),
    "detailflow_jax.convert.lpips": (("vgg", "lpips", "out", "force"), ("--vgg=x", "--out=x"),
                                     "--lpips"),
    "detailflow_jax.convert.siglip2": (("checkpoint", "out", "layers", "heads", "prefix"),
                                       ("--checkpoint=x", "--out=x", "--heads=four"), "--heads"),
    "detailflow_jax.convert.gpt": (("checkpoint", "entry", "config", "print_config", "out"),
                                   ("--checkpoint=x", "--out=x", "--config.model.no_such_key=1"),
                                   "--config.model.no_such_key=1"),
    "detailflow_jax.convert.tokenizer": (("checkpoint", "config", "print_config", "out"),
                                         ("--checkpoint=x", "--out=x"), "--config"),
    "detailflow_jax.data.imagefolder": (("root", "data_dir", "rebuild"), ("--root=x",),
                                        "--data_dir"),
    "detailflow_jax.eval.reference_stats": (("images", "inception", "out", "batch_size",
                                             "store_images", "preprocess"),
                                            ("--images=x", "--inception=i", "--out=o",
                                             "--preprocess=bilinear"), "--preprocess"),
    "detailflow_jax.eval.tokenizer_eval": (("tokenizer", "tokenizer_config", "data_config",
                                            "inception", "noisy_eval", "num_images"),
                                           ("--tokenizer=t", "--out=o", "--num_images=0"),
                                           "--num_images"),
    "detailflow_jax.eval.evaluate": (("gpt", "gpt_config", "tokenizer", "cfg_scale", "labels",
                                      "reference", "no_metrics", "chunk_size"),
                                     ("--gpt=g", "--out=o"), "--inception and --reference"),
    "detailflow_jax.eval.sample": (("gpt", "gpt_config", "tokenizer", "cfg_scale", "classes",
                                    "npz", "num_samples"), ("--gpt=g", "--out=o", "--npz"),
                                   "--npz needs --num_samples"),
    "benchmarks.inception": (("batch", "image_size", "dtype", "iters"), ("--batch=many",),
                             "--batch"),
    "benchmarks.peaks": (("dtype", "size"), ("--dtype=fp8",), "--dtype"),
    "benchmarks.sampling": (("variant", "num_tokens", "batch", "cfg_scale", "scan"),
                            ("--no_such_flag",), "no_such_flag"),
    "benchmarks.training": (("part", "tokenizer_config", "gpt_config", "steps"),
                            ("--part=neither",), "--part"),
}
# flags that several commands define: one help text each
SHARED = ("force", "config", "print_config", "tokenizer_config", "gpt_config", "preprocess",
          "verbose", "gpt", "no_ema", "cfg_scale", "top_k")


def _main(module: str):
    return importlib.import_module(module).main


def _flag_set(module: str) -> flags.FlagValues:
    fv = flags.FlagValues()
    importlib.import_module(module)._define_flags(fv)
    cli.define_verbose(fv)
    return fv


@pytest.mark.parametrize("module", sorted(OWN_FLAG_SET))
def test_help_lists_the_flags_and_verbose(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        _main(module)(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "\nflags:\n" in out
    for name in (*OWN_FLAG_SET[module][0], "verbose"):
        assert f"  --{name}:" in out or f"  --[no]{name}:" in out, (name, out)
    assert "on an error, print the traceback" in out


@pytest.mark.parametrize("module", sorted(OWN_FLAG_SET))
def test_bad_input_is_one_line(module, capsys):
    _, argv, fragment = OWN_FLAG_SET[module]
    from detailflow_jax import cli_errors
    with pytest.raises(SystemExit) as exit_:
        cli_errors.guard(_main(module))(list(argv))
    assert exit_.value.code == EXIT_STATUS
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], lines


def test_a_shared_flag_reads_the_same_everywhere():
    helps: dict[str, set[str]] = {}
    for module in OWN_FLAG_SET:
        fv = _flag_set(module)
        for name in SHARED:  # a benchmark's --cfg_scale or --gpt_config means something else
            if name in fv and (name == "verbose" or not module.startswith("benchmarks")):
                helps.setdefault(name, set()).add(fv[name].help)
    assert {name: len(texts) for name, texts in helps.items()} == dict.fromkeys(helps, 1), helps
    assert len(helps) == len(SHARED)


def test_old_spellings_and_fresh_values_per_call():
    """argparse's ``--batch-size`` / ``--no-noisy_eval`` still parse, and a value given to one
    call does not leak into the next (each call has its own flags)."""
    from benchmarks import inception as bench
    from detailflow_jax.eval import reference_stats, tokenizer_eval
    args = ["--images=x", "--inception=i", "--out=o", "--batch-size", "8", "--store-images=3"]
    parsed = cli.parse(args, "", reference_stats._define_flags, reference_stats.OLD_SPELLINGS)
    assert (parsed.batch_size, parsed.store_images) == (8, 3)
    assert cli.parse(args[:3], "", reference_stats._define_flags).batch_size == 64
    base = ["--tokenizer=t", "--out=o"]
    assert tokenizer_eval.parse_args([*base, "--noisy_eval"]).noisy_eval
    assert not tokenizer_eval.parse_args([*base, "--noisy_eval", "--no-noisy_eval"]).noisy_eval
    assert cli.parse(["--image-size=64"], "", bench._define_flags,
                     {"image-size": "image_size"}).image_size == 64


def test_config_flags_take_overrides_as_the_trainers_do():
    from detailflow_jax.convert import gpt
    fv = cli.parse(["--checkpoint=x", "--out=o", "--config",
                    os.path.join(ROOT, "configs", "ar_fashion_mnist.py:smoke"),
                    "--config.model.n_layer=3"], "", gpt._define_flags)
    assert cli.loaded_config(fv).model.n_layer == 3
    from detailflow_jax.eval import tokenizer_eval
    fv = tokenizer_eval.parse_args(["--tokenizer=t", "--out=o", "--data_config",
                                    os.path.join(ROOT, "configs", "tokenizer_fashion_mnist.py"),
                                    "--data_config.data.image_size=48"])
    data = tokenizer_eval.resolve_data_config("t", cli.loaded_config(fv, "data_config"), {})
    assert data.image_size == 48


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != VERBOSE_ENV}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module, names", [
    ("detailflow_jax.train.ar", ("config", "workdir", "print_config")),
    ("detailflow_jax.tokenizer.extract", ("config", "print_config", "tokenizer", "out")),
    ("detailflow_jax.preflight", ("config", "print_config", "topology", "recipe")),
    ("detailflow_jax.quickstart", ("workdir", "smoke", "gpt_steps")),
])
def test_global_flag_commands_list_their_flags_and_refuse_an_unknown_one(module, names):
    proc = _run(module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in (*names, "verbose"):
        assert f"  --{name}:" in proc.stdout or f"  --[no]{name}:" in proc.stdout, proc.stdout
    assert "on an error, print the traceback" in proc.stdout
    if module.endswith(("quickstart", "extract")):
        bad = _run(module, "--no_such_flag=1")
        assert bad.returncode == EXIT_STATUS and "Traceback" not in bad.stderr, bad.stderr
        assert bad.stderr.strip().splitlines()[-1].startswith("error: "), bad.stderr
