r"""Class-conditional samples from a trained (or converted) GPT + tokenizer: PNG grids and an ADM
``.npz``.

    python -m detailflow_jax.eval.sample --gpt workdir/ar --out workdir/samples
    python -m detailflow_jax.eval.sample --tokenizer /ckpt/df16 --tokenizer_config configs/tokenizer.py:DF-16 \
        --gpt /ckpt/gpt_l_128 --gpt_config configs/gpt.py:L/128 --out samples/ --cfg_scale 1.45 \
        --num_samples 50000 --npz

``--gpt`` and ``--tokenizer`` take training work directories (latest checkpoint; the GPT's EMA
weights unless ``--no_ema``) or converted orbax parameter directories (then ``--gpt_config`` /
``--tokenizer_config``). With an AR work directory the tokenizer defaults to the one its codes were
extracted with, and the sampling settings to its config's ``sampling`` section. Writes to ``--out``:

  samples.png          rows = classes (``--classes``, default: the config's sample_classes or the
                       first 16), ``--num_per_class`` columns, each row labelled with its class name
                       (``--class_names``, default: the names recorded with the AR run's codes, else
                       "class k")
  coarse_to_fine.png   the first sample of every row decoded from its first t tokens, t increasing
                       to the right
  samples.gif          the grid refining as tokens arrive: frame k = every sample from its first t_k
                       tokens
  samples_<K>.npz      with ``--num_samples K --npz``: ``arr_0`` uint8 (K, R, R, 3) (the ADM
                       evaluator's input) and ``labels`` (K,), labels drawn uniformly (the official
                       protocol)

The reusable piece is ``inference/generator.py``'s ``ImageGenerator``: labels + key -> uint8 images.
"""  # noqa: E501

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from etils import epath

from detailflow_jax import cli, cli_errors, distributed, sharding, storage
from detailflow_jax.config_lib import ConfigError, load_config_file
from detailflow_jax.data import codes as codes_lib
from detailflow_jax.eval import cli_flags
from detailflow_jax.inference.generator import ImageGenerator, default_classes, sampling_settings
from detailflow_jax.inference.weights import (is_training_workdir, load_gpt, load_tokenizer,
                                              workdir_config)


def ar_workdir_tokenizer(config: ml_collections.ConfigDict) -> tuple[str, Any, str | None]:
    """(tokenizer path, model config or None, config spec or None) an AR run was set up with: its
    ``tokenizer`` field, else the tokenizer recorded in its codes' metadata."""
    if config.get("tokenizer"):
        return config.tokenizer, None, config.get("tokenizer_config") or None
    meta = codes_lib.read_metadata(config.codes_dir)
    return meta.tokenizer["path"], meta.tokenizer["model"], None


def load_generator(
    gpt: str,
    mesh: jax.sharding.Mesh,
    tokenizer: str | None = None,
    gpt_config: str | None = None,
    tokenizer_config: str | None = None,
    ema: bool = True,
    dtype: str | None = None,
    **setting_overrides,
) -> tuple[ImageGenerator, ml_collections.ConfigDict]:
    """An ImageGenerator from weight directories (see the module docstring), and the GPT's config
    file contents (the AR training config, or the --gpt_config file)."""
    config = (
        load_config_file(gpt_config)
        if gpt_config
        else workdir_config(gpt)
        if is_training_workdir(gpt)
        else None
    )
    overrides = {"dtype": dtype} if dtype else {}
    gpt_cfg, params, shardings = load_gpt(gpt, mesh, gpt_config, ema=ema, **overrides)
    tok_model = None
    if not tokenizer:
        if config is None or "codes_dir" not in config:
            raise ConfigError(
                "pass --tokenizer (the GPT directory does not say which tokenizer it was trained "
                "on)"
            )
        tokenizer, tok_model, spec = ar_workdir_tokenizer(config)
        tokenizer_config = tokenizer_config or spec
    tok_cfg, tok_params = load_tokenizer(tokenizer, mesh, tokenizer_config, model_cfg=tok_model)
    if (
        tok_cfg.num_latent_tokens != gpt_cfg.num_tokens
        or tok_cfg.codebook_size != gpt_cfg.vocab_size
    ):
        raise ConfigError(
            f"the tokenizer (N={tok_cfg.num_latent_tokens}, codebook {tok_cfg.codebook_size}) does "
            "not "
            f"match the GPT (N={gpt_cfg.num_tokens}, vocab {gpt_cfg.vocab_size})"
        )
    section = config.sampling if config is not None and "sampling" in config else {}
    settings = sampling_settings(section, **setting_overrides)
    return ImageGenerator(
        gpt_cfg, params, shardings, tok_cfg, tok_params, mesh, settings
    ), config or {}


def class_names(config: Any, names_file: str | None = None) -> list[str] | None:
    """The class names for the grid rows: one per line of ``names_file`` (line k names class k),
    else those recorded with an AR run's codes, else None (rows then read "class k")."""
    if names_file:
        return epath.Path(names_file).read_text().splitlines()
    codes_dir = config.get("codes_dir") if config else None
    if codes_dir and epath.Path(codes_dir, codes_lib.METADATA_FILE).exists():
        return list(codes_lib.read_metadata(codes_dir).class_names)
    return None


def sample(
    gpt: str,
    out: str,
    tokenizer: str | None = None,
    gpt_config: str | None = None,
    tokenizer_config: str | None = None,
    classes: Sequence[int] | None = None,
    num_per_class: int = 8,
    num_samples: int = 0,
    npz: bool = False,
    batch_size: int = 64,
    seed: int = 0,
    ema: bool = True,
    dtype: str | None = None,
    class_names_file: str | None = None,
    **setting_overrides,
) -> dict[str, str]:
    """Writes the PNGs and the GIF (and the npz); returns {name: path}."""
    distributed.maybe_initialize()
    mesh = sharding.make_mesh((-1, 1, 1))
    generator, config = load_generator(
        gpt, mesh, tokenizer, gpt_config, tokenizer_config, ema, dtype, **setting_overrides
    )
    data = generator.data_parallelism
    batch_size = sharding.round_up(batch_size, data)
    classes = list(classes) if classes else default_classes(generator.gpt_cfg.num_classes, config)
    bad = [c for c in classes if not 0 <= c < generator.gpt_cfg.num_classes]
    if bad:
        raise ConfigError(
            f"classes {bad} are out of range: the GPT has {generator.gpt_cfg.num_classes} classes"
        )
    key = jax.random.key(seed)
    grid_batch = min(sharding.round_up(len(classes) * num_per_class, data), batch_size)
    names = class_names(config, class_names_file)
    grids = generator.class_grid(
        classes, num_per_class, jax.random.fold_in(key, 0), grid_batch, class_names=names
    )
    paths = {}
    main = distributed.is_main_process()
    if main:
        out = storage.prepare_dir(out)
        paths.update({name: str(path) for name, path in grids.save(out).items()})
    if num_samples and npz:
        labels = (
            np.random.default_rng(seed)
            .integers(0, generator.gpt_cfg.num_classes, num_samples)
            .astype(np.int32)
        )
        images = generator.many(labels, jax.random.fold_in(key, 1), batch_size)
        if main:
            paths["npz"] = os.fspath(out / f"samples_{num_samples}.npz")
            storage.save_npz(paths["npz"], arr_0=images, labels=labels)
    return paths


def _define_flags(fv: flags.FlagValues) -> None:
    cli_flags.define_generator(fv)
    cli.define_out(fv, "output directory")
    flags.DEFINE_list("classes", None, "class ids, one grid row each (default: the config's or the "
                      "first 16)", flag_values=fv)
    flags.DEFINE_integer("num_per_class", 8, "samples per class in samples.png", flag_values=fv)
    flags.DEFINE_string("class_names", None, "text file, line k = the name of class k, for the row "
                        "labels (default: the names recorded with the AR run's codes, else 'class "
                        "k')", flag_values=fv)
    flags.DEFINE_integer("num_samples", 0, "with --npz: this many samples with uniformly drawn "
                         "labels", flag_values=fv)
    flags.DEFINE_bool("npz", False, "write samples_<K>.npz (ADM evaluator format)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "global sampling batch (rounded up to a multiple of the "
                         "devices)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=fv)


def main(argv: list[str] | None = None) -> dict:
    from absl import logging as absl_logging
    f = cli.parse(argv, __doc__, _define_flags)
    # orbax logs every restore through absl at INFO
    absl_logging.set_verbosity(absl_logging.WARNING)
    if f.npz and not f.num_samples:
        raise ConfigError("--npz needs --num_samples K")
    if f.num_per_class < 1:
        raise ConfigError(f"--num_per_class={f.num_per_class}: must be >= 1 (samples per class "
                          "in samples.png)")
    paths = sample(f.gpt, f.out, f.tokenizer, f.gpt_config, f.tokenizer_config,
                   [int(c) for c in f.classes] if f.classes else None, f.num_per_class,
                   f.num_samples, f.npz, f.batch_size, f.seed, not f.no_ema, f.dtype, f.class_names,
                   **cli_flags.sampling_overrides(f))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


if __name__ == "__main__":
    cli_errors.run(main)
