"""Score a trained method on a RAVEL arrow split into an output folder (tools/eval_ravel.py)."""

from __future__ import annotations

import pathlib
import sys
from typing import Any, Sequence


def check_request(modes: Sequence[str], out: str | pathlib.Path, overwrite: bool) -> pathlib.Path:
    """ValueError for unknown modes or an output folder that may not be replaced (checked before
    anything is loaded); the output path."""
    from hyperdas_jax.config import MODES

    out = pathlib.Path(out)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; choose from {MODES}")
    if out.exists() and not overwrite:
        raise ValueError(f"output folder already exists: {out} (pass --overwrite to replace it)")
    if out.exists() and not (out.is_dir() and (out / "results.json").is_file()):
        raise ValueError(f"{out} holds no results.json: --overwrite only replaces an earlier evaluation's "
                         "folder; choose another --out")
    return out


def evaluate_run(method, data: str, out: str, *, modes: Sequence[str], n_answer_tokens: int | str | None = "run",
                 tokenizer: str | None = None, batch_size: int | None = None, limit: int | None = None,
                 heatmaps: int = 4, overwrite: bool = False, progress: bool = True,
                 run: str | None = None) -> dict[str, Any]:
    """Cause / isolate / disentangle per mode with the no-intervention row, written atomically to
    `out` (results.json, results.md, heatmaps/); returns the results.

    Unset choices come from the method's run config: `n_answer_tokens="run"`, `tokenizer` (a
    folder; default the method's own tokenizer, else the run's target.path), `batch_size`.
    Raises ValueError / RavelError / TargetError on bad input, writing nothing.
    """
    from hyperdas_jax.atomic import atomic_directory
    from hyperdas_jax.data import collate, ravel_store
    from hyperdas_jax.evaluate import evaluate, save_results
    from hyperdas_jax.target import check_tokenizer, load_tokenizer
    from hyperdas_jax.train import target_config, with_answer_tokens

    out = check_request(modes, out, overwrite)
    rows = ravel_store.load_rows(data)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    cfg = getattr(getattr(method, "steps", None), "cfg", None)
    if cfg is not None:
        from hyperdas_jax.compute_dtype import resolve
        from hyperdas_jax.data.build import screen_mismatch

        warning = screen_mismatch(data, resolve(cfg.target.dtype))
        if warning:
            print(warning, file=sys.stderr)
    k = n_answer_tokens
    if k == "run":
        k = cfg.eval.n_answer_tokens if cfg is not None else getattr(method, "n_answer_tokens", 3)
    own_tokenizer = getattr(method, "tokenizer", None)  # read first: a rebuilt method does not carry it
    method = with_answer_tokens(method, k)
    if tokenizer is not None or own_tokenizer is None:
        folder = tokenizer or (cfg.target.path if cfg is not None else None)
        if folder is None:
            raise ValueError("no tokenizer: pass --tokenizer DIR")
        own_tokenizer = load_tokenizer(folder)
        if hasattr(method, "steps"):
            check_tokenizer(own_tokenizer, target_config(method))
    options = collate.CollateOptions(
        batch_size=batch_size or (cfg.eval.batch_size if cfg is not None else 16),
        base_suffix_visible=cfg.data.base_suffix_visible if cfg is not None else False,
        source_suffix_visible=cfg.data.source_suffix_visible if cfg is not None else False,
    )
    with atomic_directory(out) as tmp:
        results = evaluate(method, rows, own_tokenizer, modes=modes, collate_options=options, n_answer_tokens=k,
                           heatmap_dir=tmp / "heatmaps" if heatmaps > 0 else None, n_heatmaps=heatmaps,
                           progress=progress)
        # Paths in the results name the final folder, not the temporary one.
        results["heatmaps"] = [str(out / pathlib.Path(p).relative_to(tmp)) for p in results["heatmaps"]]
        results["data"], results["run"] = str(data), str(run)
        save_results(results, tmp)
    return results
