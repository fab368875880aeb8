"""Score a trained run on a RAVEL arrow split: cause / isolate / disentangle per mode, with the no-intervention row.

  python -m tools.eval_ravel --run runs/smollm2_city --data data/smollm2_city_strict/test \
      --modes soft column_argmax bidding_argmax --out runs/smollm2_city/eval_test
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import pathlib
import shutil
import sys
import tempfile

MODES = ("soft", "column_argmax", "bidding_argmax")


def load_method(run_dir: str):
    """The eval-step method of a trained run (see hyperdas_jax.evaluate for the interface)."""
    try:
        from hyperdas_jax.checkpoint import CheckpointError, load_trained_method
    except ImportError as e:
        raise ValueError(f"cannot load trained runs in this version ({e})") from None
    try:
        return load_trained_method(run_dir)
    except CheckpointError as e:
        raise ValueError(str(e)) from None


def with_answer_tokens(method, k: int | None):
    """The method with its jitted steps rebuilt to score the first k answer tokens (a shallow copy).

    Methods built on `hyperdas_jax.train.Steps` (HyperDAS, MDAS) are rebuilt; any other method is
    returned as it is and the evaluator checks that its k agrees.
    """
    steps = getattr(method, "steps", None)
    if steps is None or steps.n_answer_tokens == k:
        return method
    from flax import nnx

    from hyperdas_jax.train import Steps

    cfg = dataclasses.replace(steps.cfg, eval=dataclasses.replace(steps.cfg.eval, n_answer_tokens=k))
    target = nnx.merge(steps.target_graphdef, steps.target_state)
    rebuilt = copy.copy(method)
    rebuilt.steps = Steps(steps.model(method.params), target, cfg, forward_fn=steps.forward_fn)
    return rebuilt


def _answer_tokens(text: str):
    if text in ("all", "run"):
        return None if text == "all" else text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="trained run directory")
    parser.add_argument("--data", required=True, help="RAVEL arrow split folder, e.g. data/<name>/test")
    parser.add_argument("--modes", nargs="*", default=list(MODES),
                        help="inference modes to score (none: only the no-intervention row)")
    parser.add_argument("--n-answer-tokens", type=_answer_tokens, default="run",
                        help="exact match over the first k answer tokens, or 'all' (default: the run's setting)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (default: the method's own, else the run config's target.path)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the run's eval setting)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    parser.add_argument("--heatmaps", type=int, default=4, help="rows that get selection heatmaps per mode")
    parser.add_argument("--out", required=True, help="output folder: results.json, results.md, heatmaps/")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from hyperdas_jax.config import MODES as KNOWN_MODES
    from hyperdas_jax.data import collate, ravel_store
    from hyperdas_jax.data.ravel_raw import RavelError
    from hyperdas_jax.evaluate import evaluate, results_markdown, save_results
    from hyperdas_jax.target import TargetError

    out = pathlib.Path(args.out)
    tmp = None
    try:
        bad = [m for m in args.modes if m not in KNOWN_MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; choose from {KNOWN_MODES}")
        if out.exists() and not args.overwrite:
            raise ValueError(f"output folder already exists: {out} (pass --overwrite to replace it)")
        rows = ravel_store.load_rows(args.data)
        if args.limit is not None:
            rows = rows.select(range(min(args.limit, len(rows))))
        method = load_method(args.run)
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
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        batch_size = args.batch_size or (cfg.eval.batch_size if cfg is not None else 16)
        options = collate.CollateOptions(
            batch_size=batch_size,
            base_suffix_visible=cfg.data.base_suffix_visible if cfg is not None else False,
            source_suffix_visible=cfg.data.source_suffix_visible if cfg is not None else False,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        results = evaluate(method, rows, tokenizer, modes=args.modes, collate_options=options, n_answer_tokens=k,
                           heatmap_dir=tmp / "heatmaps" if args.heatmaps > 0 else None, n_heatmaps=args.heatmaps,
                           progress=not args.quiet)
        # Paths in the results name the final folder, not the temporary one.
        results["heatmaps"] = [str(out / pathlib.Path(p).relative_to(tmp)) for p in results["heatmaps"]]
        results["data"], results["run"] = str(args.data), str(args.run)
        save_results(results, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except (ValueError, RavelError, TargetError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp)
    print(results_markdown(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
