"""Device mesh, logical-axis rules and born-sharded initialisation.

Every parameter carries logical axis names (``nn.with_logical_partitioning``) and the models pin
their activations at block boundaries with ``constrain`` (``activation_*`` names, as in MaxText);
``DEFAULT_RULES`` maps both onto the mesh axes ``(data, fsdp, tensor)``. A training config carries
its rules as data (``config.sharding_rules``, see ``rules_config``) and the trainers pass them to
every place that shards.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from detailflow_jax.config_lib import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axes. Names not listed here are replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("qkv", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),
    ("patch", None),
    ("codebook", None),
    ("code_dim", None),
    ("pixels", None),
    ("cache_batch", BATCH_AXES),
    ("cache_heads", "tensor"),
    # Activations: the batch over every data axis and the embedding dimension whole, so FSDP shards
    # parameters and optimizer state only (each weight is all-gathered before use and its gradient
    # reduce-scattered). Left to itself the partitioner may shard activations like the weights next
    # to them (embed over fsdp), which costs an all-gather of whole (batch, length, vocab)
    # cotangents.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


# Logical axes of the activations the models pin (`constrain`): the residual stream (batch, length,
# embed), the attention heads (batch, length, heads, head_dim) and the MLP's hidden units (batch,
# length, mlp).
STREAM = ("activation_batch", "activation_length", "activation_embed")
HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
HIDDEN = ("activation_batch", "activation_length", "activation_mlp")


class MeshError(ConfigError):
    """A mesh that cannot be built on the devices at hand, or that does not divide a sharded
    dimension."""


def rules_config(rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> ml_collections.ConfigDict:
    """``config.sharding_rules``: logical name -> tuple of mesh axes (``()`` = replicated), one type
    for every entry so that each can be overridden on the command line
    (``--config.sharding_rules.embed="()"``)."""
    as_tuple = lambda axes: (
        () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    )  # noqa: E731
    return ml_collections.ConfigDict({name: as_tuple(axes) for name, axes in rules})


def rules_from_config(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """The Flax rules of a training config's ``sharding_rules`` (``DEFAULT_RULES`` when it has
    none); raises MeshError for an axis that is not a mesh axis."""
    if config.get("sharding_rules") is None:
        return DEFAULT_RULES
    rules = []
    for name, axes in config.sharding_rules.items():
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise MeshError(
                f"sharding_rules.{name}={axes}: {unknown} are not mesh axes; use a tuple of "
                f"{MESH_AXES}"
                " (() = replicated)"
            )
        rules.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(rules)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pins activation ``x`` to the sharding of its logical ``names`` under the rules in context
    (``nn.logical_axis_rules`` inside ``jax.set_mesh``); a no-op without them (single-device code,
    the sampler)."""
    return nn.with_logical_constraint(x, tuple(names))


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills one ``-1`` entry with "the rest" and checks that the product is the device count."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise MeshError(
            f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}"
        )
    if shape.count(-1) > 1:
        raise MeshError(f"mesh shape {shape}: at most one axis may be -1 ('the rest')")
    if any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"mesh shape {shape}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise MeshError(
                f"mesh shape {shape}: {num_devices} devices are not divisible by {known}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} devices but {num_devices} "
            "are available; "
            "set one axis to -1 to take the rest"
        )
    return shape


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Mesh over ``(data, fsdp, tensor)`` with Auto axes (so logical constraints are hints, not
    assertions)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(
        np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
    )


def logical_to_shardings(boxed_tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of ``nn.LogicallyPartitioned`` (or plain) leaves, e.g. from
    ``jax.eval_shape``."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def _with_shardings(
    fn: Callable[[Any, Any, NamedSharding], Any], abstract_tree: Any, shardings: Any
) -> Any:
    """``fn(path, leaf, sharding)`` over the leaves of the unboxed ``abstract_tree``. ``shardings``
    may hold one sharding for a subtree without leaves (the optax.MaskedNode of a masked optimiser's
    frozen part); that subtree is kept as it is."""
    def pair(path, sharding, subtree):
        return fn(path, subtree, sharding) if jax.tree.leaves(subtree) else subtree

    return jax.tree_util.tree_map_with_path(pair, shardings, nn.unbox(abstract_tree))


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
    """Raises MeshError naming the parameter and dimension when a sharded dimension does not divide
    evenly."""
    _with_shardings(_check_leaf_divisible, abstract_tree, shardings)


def _check_leaf_divisible(path, leaf, sharding) -> None:
    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    for dim, (size, axes) in enumerate(zip(leaf.shape, spec)):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        parts = math.prod(sharding.mesh.shape[a] for a in axes)
        if size % parts:
            raise MeshError(
                f"{jax.tree_util.keystr(path)}: dimension {dim} has size {size}, which mesh axes "
                f"{axes} "
                f"({parts} devices) do not divide; change the mesh or the model size"
            )


def init_sharded(
    init_fn: Callable[..., Any], mesh: Mesh, *args, rules=DEFAULT_RULES
) -> tuple[Any, Any]:
    """Runs ``init_fn(*args)`` so each device materialises only its shard. Returns (unboxed tree,
    shardings)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_to_shardings(abstract, mesh, rules)
    check_divisible(abstract, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tree = jax.jit(init_fn, out_shardings=shardings)(*args)
    return nn.unbox(tree), shardings


def abstract_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args, rules=DEFAULT_RULES) -> Any:
    """ShapeDtypeStructs carrying the shardings ``init_sharded`` would give (a restore target);
    nothing allocated, and a dimension the mesh does not divide is a MeshError naming it."""
    boxed = jax.eval_shape(init_fn, *args)
    shardings = logical_to_shardings(boxed, mesh, rules)
    check_divisible(boxed, shardings)
    return _with_shardings(
        lambda _, x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), boxed, shardings
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over the data axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (a batch to the data-parallel size)."""
    return -(-n // multiple) * multiple


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
