"""Ahead-of-time memory and FLOPs plan of the real HyperDAS train step on a (simulated) device mesh.

  python -m tools.plan_memory --config configs/llama3_8b_ravel.yaml --mesh fsdp=8
  JAX_NUM_CPU_DEVICES=16 python -m tools.plan_memory --config configs/llama3_8b_ravel.yaml --mesh fsdp=16

Nothing is allocated: the step is compiled from abstract shapes and XLA's memory and cost analyses
are read (hyperdas_jax/memory_plan.py says how, and how far CPU figures carry to accelerators).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from hyperdas_jax.memory_plan import ensure_devices, format_plan, parse_mesh, plan, prefer_accelerator_scheduling


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--mesh", default=None, help="e.g. fsdp=8 or data=2,fsdp=4 (default: the config's mesh)")
    parser.add_argument("--batch", type=int, default=None, help="global batch size (default train.batch_size)")
    parser.add_argument("--seq", type=int, default=64, help="padded base/source length")
    parser.add_argument("--editor-seq", type=int, default=32, help="padded instruction length")
    parser.add_argument("--window", type=int, default=16, help="label window")
    parser.add_argument("--budget-gib", type=float, default=14.0)
    parser.add_argument("--json", help="also write the plan as JSON here")
    parser.add_argument("--cpu-defaults", action="store_true",
                        help="compile with XLA:CPU's default scheduler and all-reduce combiner (see CPU_FLAGS)")
    args = parser.parse_args(argv)

    from hyperdas_jax.config import ConfigError, load_config, to_dict

    try:
        cfg = load_config(args.config, args.set)
        shape = parse_mesh(args.mesh) if args.mesh else tuple(cfg.mesh.shape)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if -1 in shape:
        print("error: give a concrete mesh (--mesh fsdp=8); -1 depends on the machine", file=sys.stderr)
        return 1
    ensure_devices(math.prod(shape))
    if not args.cpu_defaults:
        prefer_accelerator_scheduling()
    import jax

    if jax.device_count() < math.prod(shape):
        print(f"error: mesh {shape} needs {math.prod(shape)} devices, JAX has {jax.device_count()} "
              f"(set JAX_NUM_CPU_DEVICES={math.prod(shape)})", file=sys.stderr)
        return 1
    print(json.dumps({k: to_dict(cfg)[k] for k in ("target", "hypernet", "intervention")}, indent=None))
    result = plan(cfg, shape, batch_size=args.batch, seq=args.seq, editor_seq=args.editor_seq, window=args.window)
    print(format_plan(result, args.budget_gib))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
