"""Device mesh, the logical-axis rules table, and activation sharding constraints."""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

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


# --------------------------------------------------------------------------------------------
# Config-driven mesh, multi-host start-up, batches, and a readable parameter table


def mesh_from_config(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """The mesh a `MeshConfig` asks for (one axis may be -1: all remaining devices)."""
    return make_mesh(tuple(mesh_cfg.shape), devices)


def maybe_initialize_distributed(mesh_cfg=None) -> bool:
    """Calls `jax.distributed.initialize()` when `mesh.distributed` or `HYPERDAS_DISTRIBUTED=1` asks.

    Must run before anything touches a device. With no arguments JAX finds the coordinator
    itself on TPU pods, under SLURM and on GKE; elsewhere set JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID. Returns whether the process is part of a
    multi-process run.
    """
    wanted = bool(getattr(mesh_cfg, "distributed", False))
    wanted |= os.environ.get("HYPERDAS_DISTRIBUTED", "").lower() in ("1", "true", "yes")
    if not wanted:
        return False
    if not jax.distributed.is_initialized():
        env = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                                   ("process_id", "JAX_PROCESS_ID")) if v in os.environ}
        jax.distributed.initialize(**env)  # the coordinator comes from JAX_COORDINATOR_ADDRESS or the cluster
    return True


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The leading (batch) axis over ("data", "fsdp"); replicated over "tensor"."""
    return NamedSharding(mesh, logical_to_spec(("batch",)))


def process_rows(global_size: int, mesh: jax.sharding.Mesh) -> slice:
    """The rows of a global batch that this process's devices hold under `batch_sharding`."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_size % shards:
        raise ValueError(f"batch size {global_size} is not divisible by data*fsdp = {shards} "
                         f"(mesh {dict(mesh.shape)})")
    index = batch_sharding(mesh).addressable_devices_indices_map((global_size,))
    starts = sorted({i[0].start or 0 for i in index.values()})
    stops = sorted({global_size if i[0].stop is None else i[0].stop for i in index.values()})
    rows = slice(starts[0], stops[-1])
    if (rows.stop - rows.start) != len(starts) * (global_size // shards):
        raise ValueError("this process's batch rows are not contiguous; order the mesh devices by process")
    return rows


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Puts a global numpy batch on the mesh, leading axis over ("data", "fsdp").

    Every process passes the same global batch (collating B rows is cheap); each hands only the
    rows its own devices hold to `jax.make_array_from_process_local_data`, so nothing is copied
    to another host's devices.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        rows = process_rows(value.shape[0], mesh)
        out[key] = jax.make_array_from_process_local_data(sharding, value[rows], value.shape)
    return out


def param_specs(tree) -> dict[str, tuple[tuple[int, ...], PartitionSpec, PartitionSpec]]:
    """path -> (shape, actual spec, spec implied by the Param's logical names) for every parameter.

    `tree` is an NNX module or a state of Params (e.g. `Steps.params`). Paths are "/"-joined.
    """
    state = nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var
        names = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
        sharding = getattr(value, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
        want = logical_to_spec(tuple(names)) if names else PartitionSpec()
        out["/".join(str(p) for p in path)] = (tuple(value.shape), _trim(spec), _trim(want))
    return out


def _trim(spec: PartitionSpec) -> PartitionSpec:
    """P('fsdp', None) and P('fsdp') mean the same; drop trailing Nones so they compare equal."""
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return PartitionSpec(*parts)
