"""Disentangle score against intervention layer, for HyperDAS and MDAS, on one RAVEL attribute.

  python -m tools.sweep_layers --data data/smollm2_city_full
  python -m tools.sweep_layers --data data/smollm2_city_full --attribute Continent --layers 6 12 18 \
      --steps 120 --split test --out reports/sweep_continent

For each layer L both methods are trained on the train rows whose instruction names the attribute
(its causal rows and the isolate rows that must stay put) with `intervention.layer=L`, so both
patch the residual stream hs[L], and scored by the same evaluator on the chosen split (validation
by default: a sweep is for choosing a layer, and choices are made on validation). HyperDAS is
scored in `--mode` (soft by default). Writes <out>/sweep.md (table), <out>/sweep.png (plot),
<out>/sweep.json, and per layer the evaluator's results under <out>/layer_<L>/; layers already
scored there are not run again, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder written by tools/prepare_ravel.py")
    parser.add_argument("--config", default="configs/smollm2_ravel.yaml", help="experiment config (YAML)")
    parser.add_argument("--target", default=None, help="converted target (default: the config's target.path)")
    parser.add_argument("--attribute", default="Country", help="the intervened attribute")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="intervention layers (default: five spread over the model, e.g. 3 9 15 21 27 for 30)")
    parser.add_argument("--split", choices=("validation", "test"), default="validation", help="split scored")
    parser.add_argument("--steps", type=int, default=80, help="training steps per method and layer")
    parser.add_argument("--mode", default="soft", help="HyperDAS inference mode scored")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both methods, e.g. train.batch_size=8 (repeatable)")
    parser.add_argument("--out", default="reports/sweep_layers", help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    from hyperdas_jax.config import MODES, ConfigError
    from hyperdas_jax.pipeline.sweep_layers import SweepError, SweepOptions, sweep_layers, sweep_markdown
    from hyperdas_jax.target import TargetError

    if args.mode not in MODES:
        parser.error(f"--mode must be one of {MODES}")
    options = SweepOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SweepOptions)})
    try:
        sweep = sweep_layers(options)
    except (SweepError, ConfigError, TargetError, ValueError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    print(sweep_markdown(sweep))
    print(f"wrote {args.out}/sweep.md and {args.out}/sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
