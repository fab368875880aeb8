"""Ahead-of-time memory and FLOPs plan of the real HyperDAS train step on a (simulated) device mesh
(tools/plan_memory.py).

Everything is built from abstract shapes (`nnx.get_abstract_model`, `jax.ShapeDtypeStruct` with
shardings); no weight is allocated. The step is lowered and compiled exactly as training runs it
(donated state, pinned output shardings), then XLA's `memory_analysis()` and `cost_analysis()`
are read. On CPU, `JAX_NUM_CPU_DEVICES` simulated devices stand in for the accelerators; the
numbers are XLA's buffer assignment for one device's program (on a GPU/TPU the backend's own
scheduler can place buffers somewhat differently).
"""

from __future__ import annotations

import math
import os

GIB = 1024**3
SHAPE_KEYS = ("data", "fsdp", "tensor")
# Two XLA:CPU habits that an accelerator compiler does not share, switched off for planning
# (`--cpu-defaults` keeps them, for comparison):
# - the default CPU scheduler optimises for thread concurrency: it starts weight all-gathers as
#   early as possible and keeps the gathered copies alive; accelerator compilers schedule under a
#   memory limit, and the memory-optimised CPU scheduler is the closer stand-in;
# - the CPU all-reduce combiner fuses each gradient's all-reduce with the clip-norm partial sum of
#   the previous gradient, which chains them all after the backward pass, so every full-size
#   (not yet reduced) fp32 gradient is alive at once; GPUs and TPUs reduce-scatter each gradient
#   as it is produced.
# XLA reads these from XLA_FLAGS when the backend starts (`compile()` options do not reach them),
# so main() sets them before JAX starts.
CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",
             "--xla_disable_hlo_passes=cpu-all-reduce-combiner")


def parse_mesh(text: str) -> tuple[int, int, int]:
    """"fsdp=8", "data=2,fsdp=4" or "1,8,1" -> (data, fsdp, tensor); unnamed axes are 1."""
    if "=" not in text:
        shape = tuple(int(x) for x in text.split(","))
        if len(shape) != 3:
            raise ValueError(f"mesh {text!r}: give data,fsdp,tensor or name=size pairs")
        return shape
    sizes = dict.fromkeys(SHAPE_KEYS, 1)
    for part in text.split(","):
        name, _, size = part.partition("=")
        if name.strip() not in sizes:
            raise ValueError(f"mesh axis {name!r} is not one of {SHAPE_KEYS}")
        sizes[name.strip()] = int(size)
    return tuple(sizes[k] for k in SHAPE_KEYS)


def ensure_devices(n: int) -> None:
    """Asks for `n` simulated CPU devices when JAX has not started yet and would have fewer."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized() and "JAX_NUM_CPU_DEVICES" not in os.environ:
        if os.environ.get("JAX_PLATFORMS", "cpu") in ("cpu", ""):
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", n)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of (sharded) ShapeDtypeStructs or arrays."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def abstract_batch(batch: dict, mesh) -> dict:
    import jax

    from hyperdas_jax.sharding import batch_sharding

    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh)) for k, v in batch.items()}


def plan(cfg, shape, *, batch_size: int | None = None, seq: int = 64, editor_seq: int = 32, window: int = 16,
         compiler_options: dict | None = None) -> dict:
    """Compiles the train step for `cfg` on a `shape` mesh from abstract values and reports its memory.

    Args:
      cfg: the experiment config (only shapes and dtypes of the target are needed).
      shape: (data, fsdp, tensor).
      batch_size: global batch (default cfg.train.batch_size).
      seq: padded base and source length (RAVEL prompts + answer are <= 50 tokens: bucket 64).
      editor_seq: padded instruction length.
      window: label window (answer positions that get logits).
      compiler_options: XLA options for `compile()` (tests use a low optimisation level).
    Returns:
      A dict of per-device bytes (arguments by kind, XLA's argument/output/alias/temp sizes,
      peak estimate) and FLOPs.
    """
    import jax
    from flax import nnx

    from hyperdas_jax.loop import SyntheticBatches, target_model_config
    from hyperdas_jax.models.hyperdas import HyperDAS
    from hyperdas_jax.models.llama import Llama
    from hyperdas_jax.sharding import abstract_module, make_mesh, use_mesh
    from hyperdas_jax.train import Steps

    mesh = make_mesh(shape)
    if cfg.target.path is not None:
        from hyperdas_jax.target import read_model_config, target_overrides

        tcfg = read_model_config(cfg.target.path, **target_overrides(cfg))
    else:
        tcfg = target_model_config(cfg)
    target = nnx.merge(*abstract_module(lambda: Llama(tcfg, rngs=nnx.Rngs(0)), mesh))
    model = nnx.merge(*abstract_module(lambda: HyperDAS(tcfg, cfg, rngs=nnx.Rngs(0)), mesh))
    steps = Steps(model, target, cfg)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       jax.eval_shape(steps.tx.init, steps.params), steps.opt_shardings)
    b = batch_size or cfg.train.batch_size
    host = SyntheticBatches(b, tcfg.vocab_size, 0, editor_len=editor_seq, length=seq).batch(0)
    batch = abstract_batch(host, mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    step = jax.ShapeDtypeStruct((), "int32", sharding=replicated)
    with use_mesh(mesh):
        lowered = steps.train_fn(window).lower(steps.params, opt, steps.target_state, batch, step, key)
        compiled = lowered.compile(compiler_options)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = {
        "mesh": dict(zip(SHAPE_KEYS, shape)),
        "batch": b, "seq": seq, "editor_seq": editor_seq, "window": window,
        "trainable_params": sum(math.prod(x.shape) for x in jax.tree.leaves(steps.params)),
        "target_params": sum(math.prod(x.shape) for x in jax.tree.leaves(steps.target_state)),
        "bytes": {
            "trainable params": per_device_bytes(steps.params),
            "optimizer state": per_device_bytes(opt),
            "frozen target": per_device_bytes(steps.target_state),
            "batch": per_device_bytes(batch),
            "arguments (XLA)": mem.argument_size_in_bytes,
            "outputs (XLA)": mem.output_size_in_bytes,
            "aliased outputs (donated)": mem.alias_size_in_bytes,
            "temporaries (XLA)": mem.temp_size_in_bytes,
            "generated code": mem.generated_code_size_in_bytes,
        },
        "flops": float(cost.get("flops", float("nan"))),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
    }
    # Donated inputs share their buffers with the outputs, so they count once.
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    out["bytes"]["peak estimate"] = peak
    return out


def format_plan(result: dict, budget_gib: float) -> str:
    lines = [f"mesh {result['mesh']}, global batch {result['batch']}, base/source {result['seq']}, "
             f"editor {result['editor_seq']}, label window {result['window']}",
             f"trainable parameters {result['trainable_params'] / 1e9:.3f} B, "
             f"frozen target parameters {result['target_params'] / 1e9:.3f} B",
             "", "| per device | GiB | MiB |", "|---|---:|---:|"]
    for name, value in result["bytes"].items():
        lines.append(f"| {name} | {value / GIB:.2f} | {value / 2**20:.1f} |")
    lines.append(f"| FLOPs per step (one device's program) | {result['flops']:.3e} | |")
    peak = result["bytes"]["peak estimate"] / GIB
    verdict = "fits" if peak <= budget_gib else "does NOT fit"
    lines += ["", f"peak estimate {peak:.2f} GiB per device: {verdict} in {budget_gib:g} GiB"]
    return "\n".join(lines)


def prefer_accelerator_scheduling() -> None:
    """Adds CPU_FLAGS to XLA_FLAGS (before JAX starts its backend), unless set there already."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in CPU_FLAGS if f.split("=")[0] not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
