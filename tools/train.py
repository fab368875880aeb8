"""Train HyperDAS.

  python -m tools.train --config configs/tiny.yaml --run runs/tiny
  python -m tools.train --config configs/llama3_8b_ravel.yaml --set train.lr=2e-5 --run runs/8b
  python -m tools.train --run runs/8b --resume            # continue from the latest checkpoint
  python -m tools.train --run runs/8b_nosp --branch-from runs/8b --branch-step 250 \
      --set train.sparsity.enabled=false                  # a new run from runs/8b's step 250

The same command runs on every host of a multi-host job (see docs/launch.md). SIGTERM
(preemption) saves a checkpoint and exits 0, Ctrl-C saves one and exits 130; `--resume auto` makes a
restart script idempotent. `--resume --set train.steps=N` extends a finished run. A non-finite loss
or gradient stops training with exit 1 and nothing saved from that step on.

`--branch-from RUN` starts a new run from RUN's checkpoint (parameters, optimizer state, step, data
position) with other training settings: the config is RUN's config.json with the `--set` overrides
(or `--config` with them), and anything may change that keeps the model's and the optimizer's trees.
With the same settings the branch repeats RUN bit for bit. RUN is only read.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment config (default with --resume: the run's config.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. train.lr=3e-5 (repeatable)")
    parser.add_argument("--run", required=True, help="run directory: config.json, checkpoints/, metrics.jsonl")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="STEP",
                        help="continue from a checkpoint: latest (default), a step number, or 'auto' "
                             "(latest if any, else start fresh)")
    parser.add_argument("--branch-from", metavar="RUN",
                        help="start this new run from RUN's checkpoint with the settings given here")
    parser.add_argument("--branch-step", default="latest", metavar="STEP",
                        help="the checkpoint of --branch-from: latest (default), best or a step number")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from hyperdas_jax.checkpoint import CheckpointError, run_config
    from hyperdas_jax.config import ConfigError, to_dict
    from hyperdas_jax.target import check_target_path
    from hyperdas_jax.sharding import maybe_initialize_distributed

    try:
        cfg = run_config(args.run, args.config, args.set, resume=args.resume is not None,
                         branch_from=args.branch_from)
        check_target_path(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    maybe_initialize_distributed(cfg.mesh)  # before anything touches a device

    import jax

    from hyperdas_jax.compute_dtype import describe, resolve
    from hyperdas_jax.data.build import screen_mismatch
    from hyperdas_jax.loop import Branch, NonFiniteError, train
    from hyperdas_jax.sharding import mesh_from_config

    try:
        mesh = mesh_from_config(cfg.mesh)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(json.dumps(to_dict(cfg), indent=2))
        print(f"mesh: {dict(mesh.shape)} over {mesh.size} of {jax.device_count()} {jax.devices()[0].platform} "
              f"devices, {jax.process_count()} process(es)")
        print(f"compute dtype: target {describe(cfg.target.dtype)}, hypernetwork {describe(cfg.hypernet.dtype)}")
        for split in (cfg.data.train, cfg.data.validation):
            warning = split and screen_mismatch(split, resolve(cfg.target.dtype))
            if warning:
                print(warning, file=sys.stderr)
    try:
        branch = None if args.branch_from is None else Branch(args.branch_from, args.branch_step)
        result = train(cfg, args.run, resume=args.resume, branch=branch, mesh=mesh, progress=not args.no_progress)
    except (CheckpointError, ConfigError, ValueError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted before a checkpoint could be saved at a step boundary; the run's earlier "
              "checkpoints (if any) are intact", file=sys.stderr)
        return 130
    if jax.process_index() == 0:
        print(f"{result.status} at step {result.step}: " + json.dumps(result.metrics))
    return 130 if result.status == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
