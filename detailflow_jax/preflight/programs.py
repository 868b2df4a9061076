"""The trainer's own jitted step and abstract arguments for it, on a mesh of abstract devices."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from detailflow_jax import sharding
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.preflight import model_flops


@dataclasses.dataclass
class Program:
    jitted: Callable          # the object the trainer calls every step
    args: tuple               # ShapeDtypeStructs with shardings
    global_batch: int
    model_flops: float


def _sds(shape, dtype, sharding_):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def is_ar_config(config) -> bool:
    return "codes_dir" in config


def stand_in_schedule(resolve, config):
    """The trainer's lr schedule without a dataset: its step counts are constants of the program that change no
    shape and no cost, so one step per epoch stands in for the data the preflight does not read."""
    return resolve(config, dataset_size=config.batch_size)


def ar_train(config, mesh) -> Program:
    from detailflow_jax.train import optim
    from detailflow_jax.train.ar_step import ARStep
    trainer = ARStep(config, mesh, stand_in_schedule(optim.resolve_ar_schedule, config))
    state = trainer.abstract_state(config.seed)
    jitted = trainer.compiled(jax.tree.map(lambda x: x.sharding, state))
    b, n = config.batch_size, trainer.model_cfg.num_tokens
    batch = {"codes": _sds((b, n, 3), jnp.int16, sharding.batch_sharding(mesh, 3)),
             "label": _sds((b,), jnp.int32, sharding.batch_sharding(mesh, 1))}
    flops = model_flops.gpt_step(trainer.model_cfg, state["params"], b)
    return Program(jitted, (state, batch), b, flops)


def tokenizer_train(config, mesh) -> Program:
    from detailflow_jax.tokenizer.degradation import degradation_matrix
    from detailflow_jax.tokenizer.resolution import ResolutionTables
    from detailflow_jax.train import optim
    from detailflow_jax.train.tokenizer_step import TokenizerStep
    trainer = TokenizerStep(config, mesh, stand_in_schedule(optim.resolve_tokenizer_schedule, config))
    frozen = trainer.abstract_frozen()
    state = trainer.abstract_state(config.seed, frozen)
    tables = ResolutionTables.from_model_config(trainer.model_cfg, rounding=config.rounding)
    t = tables.num_tokens  # all tokens: the largest canvas, the most memory
    canvas = tables.canvas[t]
    jitted = trainer.compiled(canvas, jax.tree.map(lambda x: x.sharding, state), frozen)
    repl = sharding.replicated(mesh)
    size = trainer.model_cfg.image_size
    matrix = np.asarray(degradation_matrix(t, tables))
    args = (state, jax.tree.map(lambda x: _sds(x.shape, x.dtype, repl), frozen),
            _sds((config.batch_size, size, size, 3), jnp.float32, sharding.batch_sharding(mesh, 4)),
            _sds((), jnp.int32, repl), _sds(matrix.shape, matrix.dtype, repl),
            _sds((), jnp.int32, repl), _sds((), jnp.int32, repl))
    flops = model_flops.tokenizer_step(trainer, canvas, config.batch_size)
    return Program(jitted, args, config.batch_size, flops)


def build(config, mesh, program: str) -> Program:
    if program != "train":
        raise ConfigError(f"--program={program!r}: only 'train' is implemented")
    return (ar_train if is_ar_config(config) else tokenizer_train)(config, mesh)


def compile_program(prog: Program) -> Any:
    return prog.jitted.lower(*prog.args).compile()
