"""Shared config pieces: mesh recipes for common slices.

``mesh`` is ``(data, fsdp, tensor)``; -1 means "the rest of the devices". Use a recipe with
``--config.mesh=v5e-256``-style names through ``mesh_for(name)`` or set the three sizes directly.
"""

import ml_collections

# Recipes: data-parallel across hosts/slices, FSDP inside; tensor parallelism stays 1 at these model sizes.
MESH_RECIPES = {
    "cpu": (-1, 1, 1),         # one host, pure data parallel
    "1xgpu": (1, 1, 1),
    "8xH100": (1, 8, 1),       # one node: FSDP over NVLink
    "2x8xH100": (2, 8, 1),     # two nodes: data across nodes, FSDP inside
    "v4-128": (4, 16, 1),      # 64 chips (v4 counts TensorCores): 16 hosts x 4 chips
    "v5e-256": (16, 16, 1),    # 256 chips
}


def mesh_for(name: str) -> tuple[int, int, int]:
    if name not in MESH_RECIPES:
        raise KeyError(f"unknown mesh recipe {name!r}; known: {sorted(MESH_RECIPES)}")
    return MESH_RECIPES[name]


def mesh_config(shape=(-1, 1, 1)) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": shape[0], "fsdp": shape[1], "tensor": shape[2]})
