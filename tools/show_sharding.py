"""Print every parameter's path, shape, dtype, partition spec and per-device shard shape for a mesh.

  python -m tools.show_sharding --config configs/llama3_8b_ravel.yaml --mesh fsdp=8
  python -m tools.show_sharding --config configs/tiny.yaml --mesh data=2,fsdp=2,tensor=2 --only hypernet

Built from abstract shapes (nothing is allocated); simulated CPU devices stand in for the mesh.
"""

from __future__ import annotations

import argparse
import math
import sys

from hyperdas_jax.memory_plan import ensure_devices, parse_mesh


def rows(state, prefix: str):
    """(path, shape, dtype, spec, per-device shard shape) for each parameter of an (abstract) state."""
    from flax import nnx

    from hyperdas_jax.sharding import param_specs

    values = {"/".join(str(p) for p in path): v.get_value() for path, v in nnx.to_flat_state(state)}
    for path, (shape, spec, _) in param_specs(state).items():
        value = values[path]
        try:
            shard = tuple(value.sharding.shard_shape(value.shape))
        except ValueError:  # a dimension that does not divide its mesh axes
            shard = "uneven"
        yield f"{prefix}/{path}", shape, str(value.dtype), spec, shard


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--mesh", default="1,1,1", help="e.g. fsdp=8 or data=2,fsdp=2,tensor=2")
    parser.add_argument("--only", choices=("target", "hypernet"), help="print only one of the two models")
    args = parser.parse_args(argv)

    from hyperdas_jax.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
        shape = parse_mesh(args.mesh)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ensure_devices(math.prod(shape))

    from flax import nnx

    from hyperdas_jax.loop import target_model_config
    from hyperdas_jax.models.hyperdas import HyperDAS
    from hyperdas_jax.models.llama import Llama
    from hyperdas_jax.sharding import abstract_module, make_mesh

    try:
        mesh = make_mesh(shape)
    except ValueError as e:
        print(f"error: {e} (set JAX_NUM_CPU_DEVICES)", file=sys.stderr)
        return 1
    if cfg.target.path is not None:
        from hyperdas_jax.target import read_model_config, target_overrides

        tcfg = read_model_config(cfg.target.path, **target_overrides(cfg))
    else:
        tcfg = target_model_config(cfg)
    print(f"mesh: {dict(mesh.shape)}")
    print("| path | shape | dtype | spec | per-device shard |")
    print("|---|---|---|---|---|")
    models = {"target": lambda: Llama(tcfg, rngs=nnx.Rngs(0)), "hypernet": lambda: HyperDAS(tcfg, cfg, rngs=nnx.Rngs(0))}
    for name, init in models.items():
        if args.only not in (None, name):
            continue
        _, state = abstract_module(init, mesh)
        for path, pshape, dtype, spec, shard in rows(state, name):
            print(f"| {path} | {pshape} | {dtype} | {spec} | {shard} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
