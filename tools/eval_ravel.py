"""Score a trained run on a RAVEL arrow split: cause / isolate / disentangle per mode, with the no-intervention row.

  python -m tools.eval_ravel --run runs/smollm2_city --data data/smollm2_city_strict/test \
      --modes soft column_argmax bidding_argmax --out runs/smollm2_city/eval_test
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from tools.cli import answer_tokens

MODES = ("soft", "column_argmax", "bidding_argmax")


def load_method(run_dir: str, target: str | None = None):
    """The evaluator's method for a trained run (the seam tests replace with an in-process method)."""
    from hyperdas_jax.checkpoint import load_trained_method

    return load_trained_method(run_dir, target_path=target)


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
    parser.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the run's eval setting)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    parser.add_argument("--heatmaps", type=int, default=4, help="rows that get selection heatmaps per mode")
    parser.add_argument("--out", required=True, help="output folder: results.json, results.md, heatmaps/")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from hyperdas_jax.atomic import atomic_directory
    from hyperdas_jax.checkpoint import CheckpointError
    from hyperdas_jax.config import MODES as KNOWN_MODES
    from hyperdas_jax.data import collate, ravel_store
    from hyperdas_jax.data.ravel_raw import RavelError
    from hyperdas_jax.evaluate import evaluate, results_markdown, save_results
    from hyperdas_jax.target import TargetError, check_tokenizer, load_tokenizer
    from hyperdas_jax.train import target_config, with_answer_tokens

    out = pathlib.Path(args.out)
    try:
        bad = [m for m in args.modes if m not in KNOWN_MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; choose from {KNOWN_MODES}")
        if out.exists() and not args.overwrite:
            raise ValueError(f"output folder already exists: {out} (pass --overwrite to replace it)")
        if out.exists() and not (out.is_dir() and (out / "results.json").is_file()):
            raise ValueError(f"{out} holds no results.json: --overwrite only replaces an earlier evaluation's "
                             "folder; choose another --out")
        rows = ravel_store.load_rows(args.data)
        if args.limit is not None:
            rows = rows.select(range(min(args.limit, len(rows))))
        method = load_method(args.run, args.target)
        cfg = getattr(getattr(method, "steps", None), "cfg", None)
        k = args.n_answer_tokens
        if k == "run":
            k = cfg.eval.n_answer_tokens if cfg is not None else getattr(method, "n_answer_tokens", 3)
        tokenizer = getattr(method, "tokenizer", None)  # read first: a rebuilt method does not carry it
        method = with_answer_tokens(method, k)
        tokenizer_dir = args.tokenizer or (cfg.target.path if cfg is not None else None)
        if args.tokenizer is not None or tokenizer is None:
            if tokenizer_dir is None:
                raise ValueError("no tokenizer: pass --tokenizer DIR")
            tokenizer = load_tokenizer(tokenizer_dir)
            if hasattr(method, "steps"):
                check_tokenizer(tokenizer, target_config(method))
        batch_size = args.batch_size or (cfg.eval.batch_size if cfg is not None else 16)
        options = collate.CollateOptions(
            batch_size=batch_size,
            base_suffix_visible=cfg.data.base_suffix_visible if cfg is not None else False,
            source_suffix_visible=cfg.data.source_suffix_visible if cfg is not None else False,
        )
        with atomic_directory(out) as tmp:
            results = evaluate(method, rows, tokenizer, modes=args.modes, collate_options=options,
                               n_answer_tokens=k, heatmap_dir=tmp / "heatmaps" if args.heatmaps > 0 else None,
                               n_heatmaps=args.heatmaps, progress=not args.quiet)
            # Paths in the results name the final folder, not the temporary one.
            results["heatmaps"] = [str(out / pathlib.Path(p).relative_to(tmp)) for p in results["heatmaps"]]
            results["data"], results["run"] = str(args.data), str(args.run)
            save_results(results, tmp)
    except (ValueError, RavelError, TargetError, CheckpointError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: nothing written to {out}", file=sys.stderr)
        return 130
    print(results_markdown(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
