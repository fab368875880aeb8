"""Score a trained run on a RAVEL arrow split: cause / isolate / disentangle per mode, with the no-intervention row.

  python -m tools.eval_ravel --run runs/smollm2_city --data data/smollm2_city_strict/test \
      --modes soft column_argmax bidding_argmax --out runs/smollm2_city/eval_test
"""

from __future__ import annotations

import argparse
import sys

from tools.cli import answer_tokens

MODES = ("soft", "column_argmax", "bidding_argmax")


def load_method(run_dir: str, target: str | None = None, step: str | int = "best", weights: str = "average"):
    """The evaluator's method for a trained run (the seam tests replace with an in-process method)."""
    from hyperdas_jax.checkpoint import load_trained_method

    return load_trained_method(run_dir, target_path=target, step=step, weights=weights)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="trained run directory")
    parser.add_argument("--data", required=True, help="RAVEL arrow split folder, e.g. data/<name>/test")
    parser.add_argument("--modes", nargs="*", default=list(MODES),
                        help="inference modes to score (none: only the no-intervention row)")
    parser.add_argument("--n-answer-tokens", type=answer_tokens("run"), default="run",
                        help="exact match over the first k answer tokens, or 'all' (default: the run's setting)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (default: the method's own, else the run config's target.path)")
    parser.add_argument("--target", default=None,
                        help="the converted target folder (default: the run config's target.path)")
    parser.add_argument("--step", default="best",
                        help="checkpoint to score: 'best' (best validation metric), 'latest' or a step number")
    parser.add_argument("--weights", choices=("average", "trained"), default="average",
                        help="a run trained with train.weight_average: score the mean of the weights its "
                             "validation used (default) or the trained weights")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the run's eval setting)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    parser.add_argument("--heatmaps", type=int, default=4, help="rows that get selection heatmaps per mode")
    parser.add_argument("--out", required=True, help="output folder: results.json, results.md, heatmaps/")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from hyperdas_jax.checkpoint import CheckpointError
    from hyperdas_jax.data.ravel_raw import RavelError
    from hyperdas_jax.evaluate import results_markdown
    from hyperdas_jax.pipeline.eval_run import check_request, evaluate_run
    from hyperdas_jax.target import TargetError

    try:
        check_request(args.modes, args.out, args.overwrite)
        results = evaluate_run(load_method(args.run, args.target, args.step, args.weights), args.data, args.out, modes=args.modes,
                               n_answer_tokens=args.n_answer_tokens, tokenizer=args.tokenizer,
                               batch_size=args.batch_size, limit=args.limit, heatmaps=args.heatmaps,
                               overwrite=args.overwrite, progress=not args.quiet, run=args.run)
    except (ValueError, RavelError, TargetError, CheckpointError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: nothing written to {args.out}", file=sys.stderr)
        return 130
    print(results_markdown(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
