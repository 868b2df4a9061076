r"""Compile a trainer's step ahead of time for a topology: does it fit, how fast could it be.

    python -m detailflow_jax.preflight --config configs/ar_imagenet.py:N=128 --topology v5e:4x4 \
        --config.mesh.data=1 --config.mesh.fsdp=16
    python -m detailflow_jax.preflight --config configs/tokenizer_fashion_mnist.py:smoke \
        --topology cpu:8
    python -m detailflow_jax.preflight --config configs/ar_imagenet.py:N=128 --program sample \
        --topology v5e:1x1 --config.batch_size=256      # the sampler for a FID run on one chip

The mesh is ``config.mesh`` or ``--recipe NAME`` (configs/common.py). Frozen loss networks enter
as abstract arrays of their real shapes: no weight file is read, nothing is allocated. TPU
topologies need libtpu (``pip install -e ".[tpu-aot]"``); ``cpu:N`` uses N simulated CPU devices
(roofline figures of a v5e chip). Prints a table, then one JSON line; exits 1 when the step does
not fit the chip's memory.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time

from absl import flags

from detailflow_jax import cli_errors
from detailflow_jax.preflight import topology as topo_lib
from detailflow_jax.train import cli

_PROGRAM = flags.DEFINE_enum(
    "program",
    "train",
    ["train", "sample", "sample_reference", "decode"],
    "train: the trainer's step; sample: the KV-cache sampler's call (AR config, config.batch_size "
    "labels, "
    "config.sampling); sample_reference: the no-cache reference sampler (its step x the steps); "
    "decode: the "
    "tokenizer's image decoder (tokenizer config)",
)
_TOPOLOGY = flags.DEFINE_string("topology", "cpu:8",
                                "v5e:4x4, v4:2x2x1, v5p:4x4x4, v6e:8x8, cpu:N, ...")
_RECIPE = flags.DEFINE_string("recipe", None,
                              "mesh recipe of configs/common.py (overrides config.mesh)")

_WARNING_LINES = re.compile(r"(Involuntary full rematerialization.*|.*RESOURCE_EXHAUSTED.*)")
HELP_KNOBS = ("smaller --config.batch_size, more FSDP (--config.mesh.fsdp), rematerialisation "
              "(--config.model.remat=True; for the GPT --config.model.remat_policy=full saves the "
              "most, dots_saveable the least), or --config.grad_accum > 1 (AR)")


class _CapturedStderr:
    """XLA logs from C++ to fd 2; capture it during compilation so warnings can be reported."""

    def __enter__(self):
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        sys.stderr.write(self.text)
        return False


def run(config, topology_name: str, program: str = "train", recipe: str | None = None) -> dict:
    """Compiles and returns the report (the JSON line's fields)."""
    from detailflow_jax import sharding
    from detailflow_jax.preflight import analysis, programs
    if recipe:
        from configs import common
        if recipe not in common.MESH_RECIPES:  # mesh_config's KeyError would be a traceback
            raise topo_lib.TopologyError(
                f"--recipe={recipe!r}: choose one of {sorted(common.MESH_RECIPES)}"
            )
        config.mesh = common.mesh_config(recipe)
    topo = topo_lib.get(topology_name)
    shape = sharding.resolve_mesh_shape((config.mesh.data, config.mesh.fsdp, config.mesh.tensor),
                                        len(topo.devices))
    mesh = sharding.make_mesh(shape, devices=topo.devices)
    prog = programs.build(config, mesh, program)
    per_chip = topo.devices_per_chip
    hbm = int(topo.chip.hbm_bytes / per_chip)
    report = dict(topology=topology_name, chip=topo.chip.name, num_chips=topo.num_chips,
                  num_devices=len(topo.devices), mesh=dict(zip(sharding.MESH_AXES, shape)),
                  global_batch=prog.global_batch, program=program, hbm_bytes_per_chip=hbm)
    start = time.perf_counter()
    error = None
    with _CapturedStderr() as captured:
        try:
            compiled = programs.compile_program(prog)
        except Exception as e:  # the TPU compiler reports out-of-memory as an XlaRuntimeError
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            error = str(e).splitlines()[0]
    report["compile_s"] = round(time.perf_counter() - start, 2)
    report["warnings"] = sorted(set(_WARNING_LINES.findall(captured.text)))[:20]
    report["model_flops_per_step"] = prog.model_flops
    if error is not None:
        report.update(fits=False, error=error)
        return report
    report.update(analysis.memory(compiled))
    report.update(programs.cost_per_run(prog, compiled), calls_per_run=prog.calls)
    report["fits"] = report["peak_bytes_per_chip"] <= hbm
    # Device peaks shared when a chip is described as several devices (v4 per TensorCore).
    peak, bandwidth = topo.chip.peak_flops / per_chip, topo.chip.hbm_bandwidth / per_chip
    step_s = max(report["flops_per_chip"] / peak, report["bytes_accessed_per_chip"] / bandwidth)
    report["roofline_step_s"] = step_s
    peak_all = topo.num_chips * topo.chip.peak_flops
    report["roofline_mfu"] = prog.model_flops / (peak_all * step_s) if step_s else 0.0
    report["roofline_examples_per_s"] = prog.global_batch / step_s if step_s else 0.0
    report["collectives"] = analysis.collectives(compiled.as_text())
    return report


def table(report: dict) -> str:
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB"
    rows = [("topology", f"{report['topology']} ({report['num_chips']} chips of {report['chip']})"),
            ("mesh", report["mesh"]), ("global batch", report["global_batch"]),
            ("compile", f"{report['compile_s']} s")]
    if "peak_bytes_per_chip" in report:
        parts = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes")
        rows += [("peak / HBM", f"{gib(report['peak_bytes_per_chip'])} / "
                                f"{gib(report['hbm_bytes_per_chip'])}"),
                 ("args, out, temp, alias", ", ".join(gib(report[k]) for k in parts)),
                 ("flops / chip", f"{report['flops_per_chip']:.3e}"),
                 ("bytes accessed / chip", f"{report['bytes_accessed_per_chip']:.3e}"),
                 ("model flops / step", f"{report['model_flops_per_step']:.3e}"),
                 ("roofline step", f"{report['roofline_step_s'] * 1e3:.1f} ms, MFU "
                                   f"{report['roofline_mfu']:.1%}, "
                                   f"{report['roofline_examples_per_s']:.4g} examples/s")]
        rows += [(k, f"{v['count']} ops, {v['bytes'] / 2 ** 20:.1f} MiB")
                 for k, v in report["collectives"].items() if v["count"]]
    rows += [("fits", report["fits"])] + [("warning", w[:100]) for w in report["warnings"]]
    return "\n".join(f"{k:24s} {v}" for k, v in rows)


def verdict(report: dict) -> str | None:
    """None when it fits, else the one-line reason with the knobs that help."""
    if report["fits"]:
        return None
    if "error" in report:
        what = f"the compiler ran out of memory ({report['error'][:200]})"
    else:
        over = report["peak_bytes_per_chip"] - report["hbm_bytes_per_chip"]
        what = (f"needs {report['peak_bytes_per_chip'] / 2 ** 30:.2f} GiB per chip, "
                f"{over / 2 ** 30:.2f} GiB more than the "
                f"{report['hbm_bytes_per_chip'] / 2 ** 30:.2f} GiB of HBM")
    return f"does not fit on {report['topology']}: {what}; try {HELP_KNOBS}"


def main(argv) -> None:
    del argv
    config = cli.loaded_config()
    if config is None:
        print(__doc__.strip() + "\n", file=sys.stderr)
        cli_errors.fail("--config is required")
    cli.maybe_print_config(config)
    # bad input: cli.run's boundary
    report = run(config, _TOPOLOGY.value, _PROGRAM.value, _RECIPE.value)
    print(table(report))
    print(json.dumps(report), flush=True)
    reason = verdict(report)
    if reason:
        sys.exit(reason)


def _request_devices_early(argv) -> None:
    for i, a in enumerate(argv):
        if a.startswith("--topology"):
            topo_lib.request_cpu_devices(a.split("=", 1)[1] if "=" in a else argv[i + 1])
            return
    topo_lib.request_cpu_devices(_TOPOLOGY.default)


if __name__ == "__main__":
    cli_errors.take_verbose_flag()
    cli_errors.guard(_request_devices_early)(sys.argv)  # a bad --topology is one line here too
    cli.run(main, ("config", "print_config"))
