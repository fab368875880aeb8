"""Device mesh, the logical-axis rules table, and activation sharding constraints."""

from __future__ import annotations

import contextlib

import jax
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes. Model code only ever uses the names on the left.
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("seq", None),
    ("head_dim", None),
    ("subspace", None),
    ("norm", None),
)


def make_mesh(shape: tuple[int, int, int] = (1, 1, 1), devices=None) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes; one entry may be -1 (all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {tuple(shape)}")
    if -1 in shape:
        rest = 1
        for s in shape:
            rest *= s if s != -1 else 1
        if len(devices) % rest:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {tuple(shape)}")
        shape[shape.index(-1)] = len(devices) // rest
    size = shape[0] * shape[1] * shape[2]
    if size > len(devices):
        raise ValueError(f"mesh {tuple(shape)} needs {size} devices, only {len(devices)} available")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:size])


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh):
    """Sets `mesh` as the current mesh and activates the logical rules (so params are born sharded)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
        yield mesh


def logical_to_spec(names: tuple[str | None, ...]) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec through LOGICAL_RULES."""
    rules = dict(LOGICAL_RULES)
    return PartitionSpec(*(rules.get(n) if n is not None else None for n in names))


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def current_or_default_mesh(mesh: jax.sharding.Mesh | None = None) -> jax.sharding.Mesh:
    """`mesh`, else the mesh already set by the caller, else a one-device mesh."""
    if mesh is not None:
        return mesh
    current = jax.sharding.get_mesh()
    if current is not None and not current.empty:
        return current
    return make_mesh((1, 1, 1), jax.devices()[:1])


def create_sharded(init_fn, mesh: jax.sharding.Mesh | None = None):
    """Runs the module constructor `init_fn()` under jit on `mesh`, so every parameter is born sharded."""
    mesh = current_or_default_mesh(mesh)
    with use_mesh(mesh):
        return nnx.jit(init_fn)()


def abstract_module(init_fn, mesh: jax.sharding.Mesh | None = None):
    """(graphdef, abstract state with shardings) of `init_fn()` without allocating anything."""
    mesh = current_or_default_mesh(mesh)
    with use_mesh(mesh):
        return nnx.get_abstract_model(init_fn, mesh)
