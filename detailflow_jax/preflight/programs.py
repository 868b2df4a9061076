"""The trainer's own jitted step and abstract arguments for it, on a mesh of abstract devices."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from detailflow_jax import sharding
from detailflow_jax.config_lib import ConfigError
from detailflow_jax.preflight import model_flops


@dataclasses.dataclass
class Program:
    jitted: Callable          # the object the trainer calls every step
    args: tuple               # ShapeDtypeStructs with shardings
    global_batch: int
    model_flops: float
    calls: int = 1  # calls of ``jitted`` per run (the reference sampler's step runs once per step)
    # XLA's cost analysis counts a loop body once, whatever its trip count. (probe, weight):
    # ``jitted`` with one loop unrolled twice, whose extra cost (one or two iterations) counts
    # ``weight`` times more per run.
    loop_probes: tuple = ()


def _sds(shape, dtype, sharding_):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def is_ar_config(config) -> bool:
    return "codes_dir" in config


def stand_in_schedule(resolve, config):
    """The trainer's lr schedule without a dataset: its step counts are constants of the program
    that change no shape and no cost, so one step per epoch stands in for the data the preflight
    does not read."""
    return resolve(config, dataset_size=config.batch_size)


def ar_train(config, mesh) -> Program:
    from detailflow_jax import optim
    from detailflow_jax.train import ar_step

    program = ar_step.make_ar_step(
        config, mesh, stand_in_schedule(optim.resolve_ar_schedule, config)
    )
    state = program.abstract_state
    b, n = config.batch_size, program.model_cfg.num_tokens
    batch = {"codes": _sds((b, n, 3), jnp.int16, sharding.batch_sharding(mesh, 3)),
             "label": _sds((b,), jnp.int32, sharding.batch_sharding(mesh, 1))}
    flops = model_flops.gpt_step(program.model_cfg, state["params"], b)
    return Program(program.step, (state, batch), b, flops)


def tokenizer_train(config, mesh) -> Program:
    from detailflow_jax import optim
    from detailflow_jax.train import tokenizer_step
    frozen = tokenizer_step.abstract_frozen(config)
    program = tokenizer_step.make_tokenizer_step(
        config, mesh, frozen, stand_in_schedule(optim.resolve_tokenizer_schedule, config))
    tables = program.tables
    canvas = tables.canvas[tables.num_tokens]  # all tokens: the largest canvas, the most memory
    args = program.step_args(canvas, program.abstract_state)
    flops = model_flops.tokenizer_step(config, frozen, canvas, config.batch_size)
    return Program(program.steps[canvas], args, config.batch_size, flops)


def _sampling_inputs(config, mesh):
    """(GPTConfig, abstract params placed as inference/weights.py places them, their shardings,
    labels, key, settings) for ``config.batch_size`` labels per call."""
    from detailflow_jax.ar.model import GPTConfig
    from detailflow_jax.inference.generator import sampling_settings
    from detailflow_jax.inference.weights import abstract_gpt_params
    cfg = GPTConfig(**config.model.to_dict()).validate()
    params, shardings = abstract_gpt_params(cfg, mesh)
    labels = _sds((config.batch_size,), jnp.int32, sharding.batch_sharding(mesh, 1))
    key = _sds((), jax.random.key(0).dtype, sharding.replicated(mesh))
    return cfg, params, shardings, labels, key, sampling_settings(config.sampling)


def gpt_sample(config, mesh) -> Program:
    """The KV-cache sampler's jitted call, with the shardings inference/generator.py gives it. Each
    loop of more than one iteration gets a probe: the same sampler with that loop unrolled twice,
    one more iteration (two with an odd trip count, where the remainder runs as its own loop) in the
    cost analysis."""
    from detailflow_jax.ar.model import GPT
    from detailflow_jax.ar.sampling import Sampler
    cfg, params, shardings, labels, key, settings = _sampling_inputs(config, mesh)
    args = (params, labels, key, settings)
    sampler = Sampler(GPT(cfg), mesh, shardings)
    probes = []
    for i, (_, _, start, stop) in enumerate(sampler.loop_runs()):
        trips = stop - start
        if trips > 1:
            probe = Sampler(GPT(cfg), mesh, shardings, loop_unroll={i: 2})
            probes.append(
                (Program(probe.jitted, args, config.batch_size, 0.0), (trips - 1) / (1 + trips % 2))
            )
    flops = model_flops.gpt_sample(cfg, params, config.batch_size, settings.guidance)
    return Program(sampler.jitted, args, config.batch_size, flops, loop_probes=tuple(probes))


def gpt_sample_reference(config, mesh) -> Program:
    """The no-cache reference sampler at its fixed length: one jitted group step over the N - g
    token prefix, run once per sampling step (an upper bound for the true-length steps, which grow
    from 1 to N - g tokens)."""
    from detailflow_jax.ar.model import GPT
    from detailflow_jax.ar.reference import ReferenceSampler
    cfg, params, _, labels, key, settings = _sampling_inputs(config, mesh)
    sampler = ReferenceSampler(GPT(cfg), fixed_length=True)
    prefix = _sds(
        (config.batch_size, cfg.num_tokens - cfg.group_size),
        jnp.int32,
        sharding.batch_sharding(mesh, 2),
    )
    step = _sds((), jnp.int32, sharding.replicated(mesh))
    flops = model_flops.gpt_sample(cfg, params, config.batch_size, settings.guidance)
    return Program(
        sampler.jitted_step,
        (params, prefix, labels, key, settings, step, cfg.group_size),
        config.batch_size,
        flops,
        calls=cfg.num_steps,
    )


def tokenizer_decode(config, mesh) -> Program:
    """The sampler's image decoder (inference/images.py TokenDecoder): all N codes at the full
    canvas."""
    from detailflow_jax.inference.images import TokenDecoder
    from detailflow_jax.inference.weights import abstract_tokenizer_params
    params = abstract_tokenizer_params(config.model, mesh)
    decoder = TokenDecoder(config.model, params)
    t = decoder.tables.num_tokens
    canvas = decoder.tables.canvas[t]
    codes = _sds((config.batch_size, t), jnp.int32, sharding.batch_sharding(mesh, 2))
    flops = model_flops.tokenizer_decode(decoder.model.cfg, canvas, config.batch_size)
    return Program(
        TokenDecoder._decode, (decoder, params, codes, t, canvas), config.batch_size, flops
    )


PROGRAMS = {"sample": gpt_sample, "sample_reference": gpt_sample_reference}


def build(config, mesh, program: str) -> Program:
    if program == "train":
        return (ar_train if is_ar_config(config) else tokenizer_train)(config, mesh)
    if program in PROGRAMS:
        if not is_ar_config(config):
            raise ConfigError(
                f"--program={program} samples a GPT: pass an AR config (configs/ar_*.py)"
            )
        return PROGRAMS[program](config, mesh)
    if program == "decode":
        if is_ar_config(config):
            raise ConfigError("--program=decode decodes with a tokenizer: pass a tokenizer config "
                              "(configs/tokenizer_*.py)")
        return tokenizer_decode(config, mesh)
    raise ConfigError(f"--program={program!r}: choose train, sample, sample_reference or decode")


def compile_program(prog: Program) -> Any:
    return prog.jitted.lower(*prog.args).compile()


def cost_per_run(prog: Program, compiled) -> dict:
    """XLA's flops and bytes of one run: the compiled program's x ``calls``, plus the loop
    iterations that its ``loop_probes`` measure."""
    from detailflow_jax.preflight import analysis
    once = analysis.cost(compiled)
    cost = {k: v * prog.calls for k, v in once.items()}
    for probe, weight in prog.loop_probes:
        unrolled = analysis.cost(compile_program(probe))
        cost = {k: cost[k] + weight * (unrolled[k] - once[k]) for k in cost}
    return cost
