"""Inference weights from either a training work directory or a converted orbax parameter directory.

A *training work directory* (``python -m detailflow_jax.train.tokenizer`` / ``...train.ar``) holds
``config.json`` and ``checkpoints/<step>/state``; only the wanted entry of the latest state
(``params``, or ``ema`` for the GPT) is read — the optimiser state is never loaded. A *converted
directory* (``python -m detailflow_jax.convert.*``) is a bare parameter tree; its model config comes
from a config file (``FILE.py:ARG``).

    model_cfg, params = load_tokenizer("workdir/tok", mesh)
    gpt_cfg, params, shardings = load_gpt("/ckpt/gpt_l_128", mesh, config_spec="configs/gpt.py:L/128")
"""  # noqa: E501

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from detailflow_jax import sharding, storage
from detailflow_jax.ar.model import GPT, GPTConfig, init_params
from detailflow_jax.checkpoint import Checkpointer
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.config_lib import load_config_file
from detailflow_jax.params_io import restore_params
from detailflow_jax.tokenizer.config import validate
from detailflow_jax.tokenizer.model import abstract_params


# A model field only that kind of model has: tells an AR work directory from a tokenizer one.
_MODEL_MARKER = {"gpt": "n_layer", "tokenizer": "num_latent_tokens"}


def is_training_workdir(path: str) -> bool:
    return (storage.path(path) / "checkpoints").is_dir()


def workdir_config(path: str) -> ml_collections.ConfigDict:
    """The ``config.json`` a trainer wrote into its work directory."""
    file = storage.path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} is missing: {path} does not look like a training work directory"
        )
    return ml_collections.ConfigDict(storage.read_json(file))


def model_section(path: str, config_spec: str | None, what: str) -> ml_collections.ConfigDict:
    """The ``model`` section from ``config_spec`` (FILE.py:ARG) when given, else from the work
    directory."""
    if not storage.path(path).is_dir():
        raise FileNotFoundError(
            f"{path} does not exist (expected a training work directory or a converted "
            f"{what} parameter directory)"
        )
    if config_spec:
        return load_config_file(config_spec).model
    if is_training_workdir(path):
        model = workdir_config(path).model
        if _MODEL_MARKER[what] not in model:
            other = next((k for k, field in _MODEL_MARKER.items() if field in model), "different")
            raise ConfigError(f"{path} is a {other} training work directory; pass a {what} work "
                              f"directory (or a converted {what} parameter directory) as --{what}")
        return model
    example = "configs/gpt.py:L/128" if what == "gpt" else "configs/tokenizer.py:DF-16"
    raise ConfigError(f"{path} is a converted {what} parameter directory: pass its model config "
                      f"as well (--{what}_config FILE.py:ARG, e.g. {example})")


def restore_entry(workdir: str, entry: str, abstract: Any, step: int | None = None) -> Any:
    """``state[entry]`` of a trainer checkpoint (default: the newest intact one), restored onto
    ``abstract``'s shardings."""
    target = {entry: jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)}

    def read(candidate: int) -> Any:
        path = storage.path(workdir) / "checkpoints" / str(candidate) / "state"
        with ocp.PyTreeCheckpointer() as ckptr:
            return ckptr.restore(path, args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))[entry]

    checkpointer = Checkpointer(storage.path(workdir) / "checkpoints")
    try:
        return checkpointer.restore_newest(read, step)[1]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no checkpoint in {workdir}/checkpoints: train first or pass a converted directory"
        ) from None
    finally:
        checkpointer.close()


def checkpoint_step(path: str) -> int | None:
    """The step ``load_params(path)`` reads from a training work directory: its newest step whose
    checksums match (None for a converted directory)."""
    if not is_training_workdir(path):
        return None
    checkpointer = Checkpointer(storage.path(path) / "checkpoints")

    # checksums are checked by restore_newest; a stray empty folder fails here
    def has_state(step: int) -> None:
        if not (checkpointer.step_dir(step) / "state").exists():
            raise FileNotFoundError(f"{checkpointer.step_dir(step)} holds no state")

    try:
        return checkpointer.restore_newest(has_state)[0]
    finally:
        checkpointer.close()


def load_params(path: str, abstract: Any, entry: str = "params", step: int | None = None) -> Any:
    """Parameters from a training work directory (``state[entry]``, of ``step`` or the newest intact
    one) or a converted orbax directory."""
    path = storage.path(path)
    if is_training_workdir(path):
        return restore_entry(path, entry, abstract, step)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist (expected a training work directory or a converted "
            "orbax parameter directory)"
        )
    return restore_params(path, abstract)


def _sharded_abstract(boxed: Any, mesh: Mesh) -> tuple[Any, Any]:
    shardings = sharding.logical_to_shardings(boxed, mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    return abstract, shardings


def abstract_gpt_params(cfg: GPTConfig, mesh: Mesh) -> tuple[Any, Any]:
    """(ShapeDtypeStructs of the GPT's parameters placed by their logical axes on ``mesh``, their
    shardings)."""
    return _sharded_abstract(
        jax.eval_shape(lambda k: init_params(GPT(cfg), k), jax.random.key(0)), mesh
    )


def abstract_tokenizer_params(model_cfg: ml_collections.ConfigDict, mesh: Mesh) -> Any:
    """ShapeDtypeStructs of the tokenizer's parameters placed by their logical axes on ``mesh``."""
    return _sharded_abstract(abstract_params(model_cfg, boxed=True), mesh)[0]


def load_tokenizer(path: str, mesh: Mesh, config_spec: str | None = None, model_cfg: Any = None,
                   step: int | None = None) -> tuple[ml_collections.ConfigDict, Any]:
    """(tokenizer model config, params placed on ``mesh`` by their logical axes). The model config
    is ``model_cfg`` when given, else read from ``config_spec`` or the work directory; ``step``: of
    a work directory, that checkpoint (default: the newest intact one)."""
    if model_cfg is None:
        model_cfg = model_section(path, config_spec, "tokenizer")
    model_cfg = ml_collections.ConfigDict(dict(model_cfg))
    validate(model_cfg)
    return model_cfg, load_params(path, abstract_tokenizer_params(model_cfg, mesh), step=step)


def load_gpt(path: str, mesh: Mesh, config_spec: str | None = None, ema: bool = True,
             **model_overrides) -> tuple[GPTConfig, Any, Any]:
    """(GPTConfig, params, their shardings). From a work directory the EMA weights by default
    (``ema=False``: the raw weights); ``model_overrides`` change compute settings such as
    ``dtype``."""
    cfg = GPTConfig(
        **{**model_section(path, config_spec, "gpt").to_dict(), **model_overrides}
    ).validate()
    abstract, shardings = abstract_gpt_params(cfg, mesh)
    entry = "ema" if ema else "params"
    return cfg, load_params(path, abstract, entry), shardings
