"""The flags that several evaluation commands share, defined once so their ``--help`` reads the
same: the FID Inception, its preprocessing, and what ``load_generator`` needs (sample, evaluate)."""

from __future__ import annotations

from absl import flags

from detailflow_jax import cli
from detailflow_jax.nn.inception import PREPROCESS_MODES

INCEPTION_HELP = ("FID Inception: orbax dir from detailflow_jax.convert.inception, or the "
                  "pytorch-fid .pth/.npz")


def define_inception(fv: flags.FlagValues, note: str = "", required: bool = False) -> None:
    """``--inception``; ``note`` says what omitting it does."""
    flags.DEFINE_string("inception", None, INCEPTION_HELP + (f" ({note})" if note else ""),
                        flag_values=fv, required=required)


def define_preprocess(fv: flags.FlagValues, default: str) -> None:
    flags.DEFINE_enum("preprocess", default, list(PREPROCESS_MODES), "Inception input resize: "
                      "pytorch_fid (torch bilinear) or adm (the TF graph of the ADM evaluator, as "
                      "its reference batches)", flag_values=fv)


def define_generator(fv: flags.FlagValues) -> None:
    """The GPT, its tokenizer, the weights and the sampling settings of ``load_generator``."""
    flags.DEFINE_string("gpt", None, "AR training work directory or converted GPT parameter "
                        "directory", flag_values=fv, required=True)
    cli.define_gpt_config(fv)
    flags.DEFINE_string("tokenizer", None, "tokenizer work directory or converted directory "
                        "(default: the AR run's)", flag_values=fv)
    cli.define_tokenizer_config(fv)
    flags.DEFINE_bool("no_ema", False, "use the raw instead of the EMA weights of an AR work "
                      "directory", flag_values=fv)
    flags.DEFINE_string("dtype", None, "GPT compute dtype override (float32, bfloat16)",
                        flag_values=fv)
    flags.DEFINE_float("cfg_scale", None, "classifier-free guidance scale (1 = none; default: the "
                       "GPT config's)", flag_values=fv)
    flags.DEFINE_enum("cfg_schedule", None, ["constant", "gradual"], "CFG schedule (default: the "
                      "GPT config's)", flag_values=fv)
    flags.DEFINE_integer("top_k", None, "top-k filter (0 = off; default: the GPT config's)",
                         flag_values=fv)
    flags.DEFINE_float("top_p", None, "top-p filter (1 = off; default: the GPT config's)",
                       flag_values=fv)
    flags.DEFINE_float("temperature", None, "softmax temperature (default: the GPT config's)",
                       flag_values=fv)


def sampling_overrides(f: flags.FlagValues) -> dict:
    """The sampling settings of ``define_generator`` as ``load_generator`` keywords."""
    return dict(cfg_scale=f.cfg_scale, cfg_schedule=f.cfg_schedule, top_k=f.top_k, top_p=f.top_p,
                temperature=f.temperature)
