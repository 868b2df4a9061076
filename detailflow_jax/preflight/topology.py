"""Topology names -> abstract devices, and the public per-chip peaks the roofline uses."""

from __future__ import annotations

import dataclasses
import math
import os

import jax

from detailflow_jax.config_lib import ConfigError

GIB = 1024 ** 3
# Compiling needs no exclusive TPU: let several compile-only processes (tests, suites) load libtpu
# at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: compile-only
# v4 and v5p chips have 2 TensorCores; "megacore" describes each chip as one device, as jax on a
# real slice does.
MEGACORE = ("v4", "v5p")
HOST_CHIPS = 4  # libtpu's default host of 2x2x1 chips


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float      # bf16 dense FLOP/s per chip
    hbm_bandwidth: float   # bytes/s per chip
    hbm_bytes: int         # per chip


# Public figures (bf16 dense peak, HBM bandwidth, HBM capacity), per chip:
CHIPS = {
    # https://cloud.google.com/tpu/docs/v4 : 275 TFLOP/s, 32 GiB HBM2, 1228 GB/s
    "v4": Chip("v4", 275e12, 1228e9, 32 * GIB),
    # https://cloud.google.com/tpu/docs/v5e : 197 TFLOP/s, 16 GiB HBM2, 819 GB/s
    "v5e": Chip("v5e", 197e12, 819e9, 16 * GIB),
    # https://cloud.google.com/tpu/docs/v5p : 459 TFLOP/s, 95 GiB HBM2e, 2765 GB/s
    "v5p": Chip("v5p", 459e12, 2765e9, 95 * GIB),
    # https://cloud.google.com/tpu/docs/v6e : 918 TFLOP/s, 32 GiB HBM, 1640 GB/s
    "v6e": Chip("v6e", 918e12, 1640e9, 32 * GIB),
    # No roofline meaning for simulated CPU devices; figures of one v5e chip so the numbers stay
    # comparable.
    "cpu": Chip("cpu (as v5e)", 197e12, 819e9, 16 * GIB),
}


class TopologyError(ConfigError):
    """An unknown or malformed --topology (one line through the commands' error boundary)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    chip: Chip
    num_chips: int
    devices: tuple

    @property
    def devices_per_chip(self) -> float:
        """1 with megacore; 2 if a chip were described per TensorCore (its peaks then shared)."""
        return len(self.devices) / self.num_chips


def parse(name: str) -> tuple[str, tuple[int, ...]]:
    kind, sep, dims = name.partition(":")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        shape = ()
    if not sep or kind not in CHIPS or not shape or min(shape) < 1:
        raise TopologyError(f"--topology={name!r}: expected KIND:AxB[xC] with KIND in "
                            f"{sorted(CHIPS)} "
                            "(e.g. v5e:4x4, v5p:4x4x4, cpu:8)")
    return kind, shape


def request_cpu_devices(name: str) -> None:
    """Before jax starts its backend: ask for the CPU devices a ``cpu:N`` topology needs."""
    kind, shape = parse(name)
    forced = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if kind == "cpu" and not forced:
        jax.config.update("jax_num_cpu_devices", math.prod(shape))


def get(name: str) -> Topology:
    kind, shape = parse(name)
    chips = math.prod(shape)
    if kind == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < chips:
            raise TopologyError(f"--topology={name}: only {len(devices)} CPU devices; start with "
                                f"XLA_FLAGS=--xla_force_host_platform_device_count={chips} "
                                "(or use a smaller N)")
        return Topology(name, CHIPS[kind], chips, tuple(devices[:chips]))
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise TopologyError(f"--topology={name} needs libtpu to compile for TPUs: "
                            'pip install -e ".[tpu-aot]"') from e
    from jax.experimental import topologies
    extra = dict(chip_config_name="megacore") if kind in MEGACORE else {}
    if chips < HOST_CHIPS:  # a slice smaller than a host (v5e:1x1): its own host bounds
        extra["chips_per_host_bounds"] = (*shape, 1, 1)[:3]
    desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **extra)
    return Topology(name, CHIPS[kind], chips, tuple(desc.devices))
