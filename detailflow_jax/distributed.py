"""Multi-controller start-up: ``jax.distributed`` when the run spans several processes, nothing
otherwise.

Where the settings come from, first found wins:
  1. arguments of ``maybe_initialize``;
  2. command-line flags ``--coordinator_address``, ``--num_processes``, ``--process_id``,
     ``--local_device_ids`` (absl flags, defined here so every command that imports this module
     accepts them);
  3. environment ``DETAILFLOW_COORDINATOR`` (host:port of process 0), ``DETAILFLOW_NUM_PROCESSES``,
     ``DETAILFLOW_PROCESS_ID``, ``DETAILFLOW_LOCAL_DEVICE_IDS`` (comma list of this process's
     accelerator ids);
  4. auto-detection, which JAX does by itself: SLURM with more than one task, GKE TPU pods
     (``TPU_WORKER_HOSTNAMES``), and anything where ``DETAILFLOW_DISTRIBUTED=1`` is set — the TPU VM
     launcher sets it, because a TPU VM pod is only recognisable through the metadata server.
A one-process run needs nothing; ``DETAILFLOW_DISTRIBUTED=0`` switches start-up off.

On CPU, JAX 0.10 runs cross-process collectives over gloo by default
(``jax_cpu_collectives_implementation``), so a localhost group of CPU processes needs only the three
explicit settings.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

ENV_COORDINATOR = "DETAILFLOW_COORDINATOR"
ENV_NUM_PROCESSES = "DETAILFLOW_NUM_PROCESSES"
ENV_PROCESS_ID = "DETAILFLOW_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "DETAILFLOW_LOCAL_DEVICE_IDS"
ENV_SWITCH = "DETAILFLOW_DISTRIBUTED"

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    f"multi-process runs: host:port of process 0 (or ${ENV_COORDINATOR})",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, f"multi-process runs: number of processes (or ${ENV_NUM_PROCESSES})")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    None,
    f"multi-process runs: this process's id in [0, num_processes) (or ${ENV_PROCESS_ID})",
)
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids",
    None,
    f"accelerator ids this process owns, e.g. 0,1,2,3 (or ${ENV_LOCAL_DEVICE_IDS})",
)


def _flag(holder):
    return holder.value if flags.FLAGS.is_parsed() else None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} must be an integer") from None


def _parse_ids(value) -> list[int] | None:
    if value is None or value == "" or value == []:
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        return [int(i) for i in items]
    except ValueError:
        raise ValueError(
            f"local device ids {value!r} must be a comma-separated list of integers"
        ) from None


def _multi_host_environment() -> str | None:
    if os.environ.get(ENV_SWITCH) == "1":
        return f"{ENV_SWITCH}=1"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "SLURM"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "TPU pod"
    return None


def _slurm_local_device_ids() -> list[int] | None:
    """All of the node's GPUs when SLURM runs one task per node.

    JAX's SLURM detection gives each task the single GPU ``SLURM_LOCALID``, which fits one task per
    GPU but would leave 7 of 8 GPUs idle with one task per node (our sbatch layout)."""
    tasks, nodes = (
        _env_int("SLURM_NTASKS"),
        _env_int("SLURM_STEP_NUM_NODES") or _env_int("SLURM_NNODES"),
    )
    if tasks is None or nodes is None or tasks != nodes:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    count = len([d for d in visible.split(",") if d]) or _env_int("SLURM_GPUS_ON_NODE") or 0
    return list(range(count)) or None  # None on CPU-only nodes: nothing to restrict


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Initialises ``jax.distributed`` when needed (see the module docstring); returns True when it
    is initialised.

    Must run before anything touches a JAX backend (``jax.devices()`` included)."""
    if jax.distributed.is_initialized():
        return True
    if os.environ.get(ENV_SWITCH) == "0":
        return False
    coordinator_address = (
        coordinator_address or _flag(_COORDINATOR) or os.environ.get(ENV_COORDINATOR) or None
    )
    num_processes = next(
        (
            v
            for v in (num_processes, _flag(_NUM_PROCESSES), _env_int(ENV_NUM_PROCESSES))
            if v is not None
        ),
        None,
    )
    process_id = next(
        (v for v in (process_id, _flag(_PROCESS_ID), _env_int(ENV_PROCESS_ID)) if v is not None),
        None,
    )
    local_device_ids = _parse_ids(local_device_ids) or _parse_ids(_flag(_LOCAL_DEVICE_IDS)) \
        or _parse_ids(os.environ.get(ENV_LOCAL_DEVICE_IDS))

    explicit = {"coordinator address": coordinator_address, "number of processes": num_processes,
                "process id": process_id}
    if any(v is not None for v in explicit.values()):
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise ValueError(
                "multi-process start-up needs coordinator address, number of processes and "
                "process id; missing "
                f"{missing}. Pass --coordinator_address/--num_processes/--process_id, or set "
                f"{ENV_COORDINATOR}, "
                f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} — all three or none"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"process id {process_id} must lie in [0, number of processes = {num_processes})"
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids)
    elif (where := _multi_host_environment()) is not None:
        if local_device_ids is None and where == "SLURM":
            local_device_ids = _slurm_local_device_ids()
        log.info("%s: initialising jax.distributed (auto-detected settings)", where)
        jax.distributed.initialize(local_device_ids=local_device_ids)
    else:
        return False
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_main_process() -> bool:
    """Logs, metrics and images come from process 0 only."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly cross-process sharded) arrays, complete on every process.

    Every process must call it (it is a collective when arrays span processes); afterwards only
    process 0 should write what it got."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(fetch, tree)

