"""The preflight compiles the trainers' own steps for abstract topologies and reports memory,
cost and a roofline."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import ar_fashion_mnist, tokenizer_fashion_mnist
from detailflow_jax import config_lib, sharding
from detailflow_jax.ar.model import GPTConfig
from detailflow_jax.preflight import __main__ as preflight
from detailflow_jax.preflight import programs
from detailflow_jax.train import ar_step, tokenizer_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason='TPU compiles need libtpu: pip install -e ".[tpu-aot]"')
FIELDS = ("topology", "chip", "num_chips", "mesh", "global_batch", "fits", "peak_bytes_per_chip",
          "hbm_bytes_per_chip", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
          "flops_per_chip", "bytes_accessed_per_chip", "model_flops_per_step", "roofline_step_s",
          "roofline_mfu", "collectives", "warnings", "compile_s")
TINY_AR = ["--config", "configs/ar_fashion_mnist.py:smoke"]
TINY_TOK = ["--config", "configs/tokenizer_fashion_mnist.py:smoke", "--config.degradation_prob=0.0"]


def _cli(args, topology):
    # Without JAX_PLATFORMS=cpu, so that libtpu can describe TPU topologies.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = ROOT
    command = [sys.executable, "-m", "detailflow_jax.preflight", *args, "--topology", topology]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _check_report(report, topology, chips):
    assert all(f in report for f in FIELDS), set(FIELDS) - set(report)
    assert report["topology"] == topology and report["num_chips"] == chips and report["fits"]
    assert report["peak_bytes_per_chip"] == (report["argument_bytes"] + report["output_bytes"]
                                             + report["temp_bytes"] - report["alias_bytes"])
    assert report["alias_bytes"] > 0  # the state is donated
    assert 0 < report["roofline_mfu"] <= 1
    assert report["collectives"]["all-reduce"]["count"] >= 1  # data-parallel gradients are summed


def _json_line(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def _recording(monkeypatch, module, name):
    """Records what ``module.name`` returns while the test runs."""
    made, original = [], getattr(module, name)
    monkeypatch.setattr(
        module, name, lambda *args, **kwargs: made.append(original(*args, **kwargs)) or made[-1]
    )
    return made


def test_ar_step_compiles_on_cpu8_and_is_the_trainers_own_jit(monkeypatch):
    made = _recording(monkeypatch, ar_step, "make_ar_step")
    report = preflight.run(ar_fashion_mnist.get_config("smoke"), "cpu:8")
    _check_report(report, "cpu:8", 8)
    # The trainer's own builder made the step that was compiled, not a copy.
    assert len(made) == 1
    assert programs.build(ar_fashion_mnist.get_config("smoke"), sharding.make_mesh((8, 1, 1)),
                          "train").jitted is made[-1].step


def test_tokenizer_step_is_the_trainers_own_jit_on_abstract_frozen_nets(monkeypatch):
    made = _recording(monkeypatch, tokenizer_step, "make_tokenizer_step")
    config = config_lib.override(tokenizer_fashion_mnist.get_config("smoke"), degradation_prob=0.0)
    prog = programs.build(config, sharding.make_mesh((8, 1, 1)), "train")
    tables = made[-1].tables
    assert len(made) == 1 and prog.jitted is made[-1].steps[tables.canvas[tables.num_tokens]]
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(prog.args))


def test_abstract_frozen_nets_have_the_real_shapes():
    config = tokenizer_fashion_mnist.get_config("smoke")
    config.losses.update(lpips_weight=1.0, disc_type="dino", align_weight=1.0)
    frozen = tokenizer_step.abstract_frozen(config).params
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    # so400m/16 at 16 x 16 positions
    assert frozen["siglip"]["position_embedding"].shape == (256, 1152)
    assert 21e6 < count(frozen["dino"]) < 22.5e6  # ViT-S/16: 12 blocks of 12·384² plus embeddings
    assert 14e6 < count(frozen["lpips"]) < 15.5e6  # VGG16's 13 conv layers (14.7M) + 1x1 heads
    assert 400e6 < count(frozen["siglip"]) < 430e6  # "so400m"
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen))


def test_tokenizer_compiles_on_cpu8():
    config = config_lib.override(tokenizer_fashion_mnist.get_config("smoke"), degradation_prob=0.0)
    _check_report(preflight.run(config, "cpu:8"), "cpu:8", 8)


def test_too_large_config_exits_nonzero_saying_by_how_much():
    big = ["--config.model.dim=4096", "--config.model.n_layer=6", "--config.model.n_head=32"]
    result = _cli(TINY_AR + big, "cpu:8")
    assert result.returncode != 0
    assert "does not fit on cpu:8" in result.stderr and "GiB more than" in result.stderr
    assert "fsdp" in result.stderr and not _json_line(result.stdout)["fits"]


@needs_libtpu
@pytest.mark.parametrize("args", [TINY_AR, TINY_TOK], ids=["gpt", "tokenizer"])
def test_compiles_for_v5e_2x2(args):
    result = _cli(args, "v5e:2x2")
    assert result.returncode == 0, result.stderr[-2000:]
    report = _json_line(result.stdout)
    _check_report(report, "v5e:2x2", 4)
    assert report["chip"] == "v5e" and report["hbm_bytes_per_chip"] == 16 * 2 ** 30


def test_restore_target_is_the_same_from_real_or_abstract_dino_weights():
    config = tokenizer_fashion_mnist.get_config("smoke")
    config.losses.disc_type = "dino"
    mesh = sharding.make_mesh((8, 1, 1))
    abstract = tokenizer_step.abstract_frozen(config)
    real = tokenizer_step.FrozenNets({"dino": jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                                           abstract.params["dino"])})
    describe = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)
    state_of = lambda frozen: (
        tokenizer_step.make_tokenizer_step(config, mesh, frozen).abstract_state
    )
    assert describe(state_of(abstract)) == describe(state_of(real))


@pytest.mark.parametrize("canvas_t", [1, 32])
def test_analytic_tokenizer_flops_match_xlas_count_of_the_step(canvas_t):
    """The analytic count leaves out only small terms (patch embedding, quantizer, norms, softmax):
    it is at most XLA's count of the lowered step and within 10% of it — so no pass of the step is
    missed."""
    from detailflow_jax.preflight import model_flops
    config = tokenizer_fashion_mnist.get_config()
    mesh = sharding.make_mesh((-1, 1, 1))
    frozen = tokenizer_step.FrozenNets({})
    program = tokenizer_step.make_tokenizer_step(config, mesh, frozen)
    canvas = program.tables.canvas[canvas_t]
    lowered = program.steps[canvas].lower(*program.step_args(canvas, program.abstract_state))
    cost = lowered.cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    analytic = model_flops.tokenizer_step(config, frozen, canvas, config.batch_size)
    assert 0.9 * xla <= analytic <= xla


# 256 rows per chip (x 2 with CFG) x g = 8 slots x an 8,192-way vocabulary: before the argmax's
# barrier (ar/logits.py first_argmax) the TPU compiler fused the head matmul and the Gumbel noise
# into the index reduction and asked for more than v5e's 16 MiB of scoped VMEM
# (CompileTimeScopedVmemOom).
VMEM_SAMPLER = [
    "--program",
    "sample",
    "--config.model.vocab_size=8192",
    "--config.model.num_tokens=16",
    "--config.model.group_size=8",
    "--config.model.causal_num=8",
    "--config.model.n_layer=1",
    "--config.batch_size=1024",
]


@needs_libtpu
def test_sampler_compiles_for_v5e_2x2_at_a_batch_that_overflowed_vmem():
    result = _cli(TINY_AR + VMEM_SAMPLER, "v5e:2x2")
    assert result.returncode == 0, result.stderr[-2000:]
    report = _json_line(result.stdout)
    assert report["fits"] and report["program"] == "sample" and report["global_batch"] == 1024


def test_sampler_cost_counts_every_loop_iteration():
    """XLA's cost analysis counts a loop body once; the preflight adds the other iterations, so the
    cached sampler's FLOPs match the model's and the reference sampler's exceed them (it recomputes
    every prefix)."""
    config = ar_fashion_mnist.get_config("smoke")
    cached = preflight.run(config, "cpu:8", "sample")
    reference = preflight.run(config, "cpu:8", "sample_reference")
    model_per_chip = cached["model_flops_per_step"] / 8
    assert 0.8 < cached["flops_per_chip"] / model_per_chip < 1.5
    assert reference["calls_per_run"] == GPTConfig(**config.model.to_dict()).num_steps
    assert reference["flops_per_chip"] > 2 * cached["flops_per_chip"]
    assert cached["fits"] and reference["fits"] and 0 < cached["roofline_mfu"] <= 1


def test_decoder_compiles_on_cpu8_and_programs_need_their_kind_of_config():
    report = preflight.run(tokenizer_fashion_mnist.get_config("smoke"), "cpu:8", "decode")
    assert report["fits"] and report["flops_per_chip"] > 0 and report["roofline_examples_per_s"] > 0
    with pytest.raises(config_lib.ConfigError, match="pass an AR config"):
        programs.build(
            tokenizer_fashion_mnist.get_config("smoke"), sharding.make_mesh((8, 1, 1)), "sample"
        )
