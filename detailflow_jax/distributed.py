"""Multi-controller start-up: ``jax.distributed`` when the run spans several processes, nothing otherwise.

Order: explicit arguments, then ``DETAILFLOW_COORDINATOR`` / ``DETAILFLOW_NUM_PROCESSES`` / ``DETAILFLOW_PROCESS_ID``,
then auto-detection (SLURM with more than one task, TPU pod slices with more than one worker), which JAX resolves by
itself. A one-process run needs nothing.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def _multi_host_environment() -> str | None:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "SLURM"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "TPU pod"
    return None


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initialises ``jax.distributed`` when needed; returns True when it did."""
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("DETAILFLOW_COORDINATOR")
    if num_processes is None and "DETAILFLOW_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["DETAILFLOW_NUM_PROCESSES"])
    if process_id is None and "DETAILFLOW_PROCESS_ID" in os.environ:
        process_id = int(os.environ["DETAILFLOW_PROCESS_ID"])

    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "multi-process start-up needs all three of coordinator address, number of processes and process "
                f"id (got {explicit}); set DETAILFLOW_COORDINATOR, DETAILFLOW_NUM_PROCESSES and "
                "DETAILFLOW_PROCESS_ID, or none of them")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif (where := _multi_host_environment()) is not None:
        log.info("detected %s: initialising jax.distributed", where)
        jax.distributed.initialize()
    else:
        return False
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def is_main_process() -> bool:
    """Logs, metrics and images come from process 0 only."""
    return jax.process_index() == 0
