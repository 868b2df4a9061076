"""Per-process numpy batches -> global ``jax.Array``s sharded over the mesh's batch axes ``("data",
"fsdp")``."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from detailflow_jax.sharding import BATCH_AXES, batch_sharding


def to_global(batch: Any, mesh: Mesh) -> Any:
    """Every leaf (b, ...) of this process's batch -> a global array (b * process_count, ...) whose
    leading axis is split over ``data`` x ``fsdp`` and replicated over ``tensor``.

    Each process passes its own slice (as the pipeline yields it);
    ``jax.make_array_from_process_local_data`` places it on this process's devices without any
    cross-host transfer.
    """
    batch_parts = math.prod(mesh.shape[a] for a in BATCH_AXES)
    # batch shards held by this process
    local_parts = batch_parts * len(mesh.local_devices) // mesh.devices.size

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % max(local_parts, 1):
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has shape {x.shape}; its leading (batch) "
                "axis must divide "
                f"evenly over the {local_parts} batch shards on this process (mesh data x fsdp = "
                f"{batch_parts})"
            )
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree_util.tree_map_with_path(put, batch)
