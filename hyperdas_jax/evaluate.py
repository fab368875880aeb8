"""Scores any eval-step method on RAVEL rows: cause, isolate and disentangle per attribute, domain and overall."""

from __future__ import annotations

import json
import math
import os
import pathlib
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tqdm

from hyperdas_jax import bootstrap, localisation
from hyperdas_jax.data import collate
from hyperdas_jax.data.ravel_schema import as_row_list, instruction_attribute, is_causal

# The pseudo-mode of the target run on the base alone, scored with the same labels.
NO_INTERVENTION = "no intervention"
_UNSET = object()

# Scoring rules (method notes §9, ravel.md §2.5-2.6):
# - The attribute of a row is the one its instruction names (the intervened attribute A). A causal
#   row of A counts towards A's cause score; an isolate row whose instruction names A (its base
#   prompt asks another attribute B) counts towards A's isolate score.
# - Per attribute: cause = correct causal / causal rows, isolate = correct isolate / isolate rows
#   (micro averages over that attribute's rows), disentangle = (cause + isolate) / 2.
# - Per domain: cause and isolate are plain means over the domain's attributes; overall: plain
#   means over domains; at both levels disentangle = the mean of that level's cause and isolate
#   (the paper's gather_main_table aggregation). A score with no rows is None and is left out of
#   the means; disentangle is then the one score there is.
# - "pooled" is the original training script's number: correct / all rows of each kind, whatever
#   their attribute or domain.
# Every example is counted through its own `row_index`, never through batch arithmetic, so a
# smaller last batch cannot shift results between examples (the original's bookkeeping bug).


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _disentangle(cause: float | None, isolate: float | None) -> float | None:
    return _mean([cause, isolate])


def _method_answer_tokens(method: Any) -> Any:
    """The k a method scores with, if it says (`n_answer_tokens`, or `steps.n_answer_tokens`)."""
    for owner in (method, getattr(method, "steps", None)):
        if owner is not None and hasattr(owner, "n_answer_tokens"):
            return owner.n_answer_tokens
    return _UNSET


def _tally(keys: Sequence[Any], causal: np.ndarray, verdict: np.ndarray) -> dict[Any, list[int]]:
    """key -> [n_causal, correct_causal, n_isolate, correct_isolate] over the scored rows (verdict >= 0)."""
    counts: dict[Any, list[int]] = {}
    for key, c, v in zip(keys, causal, verdict):
        if v >= 0:
            entry = counts.setdefault(key, [0, 0, 0, 0])
            entry[0 if c else 2] += 1
            entry[1 if c else 3] += int(v == 1)
    return counts


def score_rows(
    rows: Sequence[Mapping[str, Any]], correct: Mapping[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """Aggregates per-example verdicts into per-attribute, per-domain, overall and pooled scores.

    Args:
        rows: the evaluated RAVEL rows (need `domain`, `attribute_type`, `edit_instruction`).
        correct: mode -> (len(rows),) int array: 1 correct, 0 wrong, -1 not scored (rows
            dropped by collation); every mode must score the same rows.

    Returns:
        mode -> {"overall": {cause, isolate, disentangle}, "pooled": {cause, isolate, disentangle,
        n_causal, n_isolate}, "domains": {domain: {cause, isolate, disentangle, attributes}},
        "attributes": {"<domain>/<attribute>": {domain, attribute, cause, isolate, disentangle,
        n_causal, n_isolate, correct_causal, correct_isolate}}}. Scores are fractions in [0, 1]
        or None where there are no rows.
    """
    keys = [(r["domain"], instruction_attribute(r)) for r in rows]
    causal = np.array([is_causal(r) for r in rows], bool)
    out = {}
    for mode, verdict in correct.items():
        verdict = np.asarray(verdict)
        if verdict.shape != (len(rows),):
            raise ValueError(f"mode {mode!r}: verdicts of shape {verdict.shape}, expected {(len(rows),)}")
        scored = verdict >= 0
        attributes = {}
        for (domain, attribute), (nc, cc, ni, ci) in sorted(_tally(keys, causal, verdict).items()):
            cause = cc / nc if nc else None
            isolate = ci / ni if ni else None
            attributes[f"{domain}/{attribute}"] = {
                "domain": domain, "attribute": attribute, "cause": cause, "isolate": isolate,
                "disentangle": _disentangle(cause, isolate),
                "n_causal": nc, "n_isolate": ni, "correct_causal": cc, "correct_isolate": ci,
            }
        domains = {}
        for domain in sorted({a["domain"] for a in attributes.values()}):
            mine = [a for a in attributes.values() if a["domain"] == domain]
            cause, isolate = _mean(a["cause"] for a in mine), _mean(a["isolate"] for a in mine)
            domains[domain] = {"cause": cause, "isolate": isolate, "disentangle": _disentangle(cause, isolate),
                               "attributes": [a["attribute"] for a in mine]}
        cause, isolate = _mean(d["cause"] for d in domains.values()), _mean(d["isolate"] for d in domains.values())
        nc, ni = int((scored & causal).sum()), int((scored & ~causal).sum())
        pc = int(((verdict == 1) & causal).sum()) / nc if nc else None
        pi = int(((verdict == 1) & ~causal).sum()) / ni if ni else None
        out[mode] = {
            "overall": {"cause": cause, "isolate": isolate, "disentangle": _disentangle(cause, isolate)},
            "pooled": {"cause": pc, "isolate": pi, "disentangle": _disentangle(pc, pi), "n_causal": nc,
                       "n_isolate": ni},
            "domains": domains,
            "attributes": attributes,
        }
    return out


def template_scores(
    rows: Sequence[Mapping[str, Any]], correct: Mapping[str, np.ndarray]
) -> dict[str, list[dict[str, Any]]] | None:
    """Cause / isolate / disentangle per base template, or None when a row lacks `base_template`.

    Held-out templates generalise unevenly, and a split's rows cluster in few of them (the
    validation split holds out a couple per attribute), so the row-level figures can hide that one
    template carries a score. A template's cause counts the causal rows whose base prompt uses it,
    its isolate the isolate rows whose base prompt uses it (those ask the template's attribute while
    the instruction names another).

    Returns:
        mode -> [{"attribute" (the attribute the template asks), "template", cause, isolate,
        disentangle, n_causal, n_isolate}], sorted by attribute and template; scores as in `score_rows`.
    """
    if not rows or any("base_template" not in r for r in rows):
        return None
    keys = [(r["attribute"], r["base_template"]) for r in rows]
    causal = np.array([is_causal(r) for r in rows], bool)
    out = {}
    for mode, verdict in correct.items():
        table = []
        for (attribute, template), (nc, cc, ni, ci) in sorted(_tally(keys, causal, np.asarray(verdict)).items()):
            cause, isolate = (cc / nc if nc else None), (ci / ni if ni else None)
            table.append({"attribute": attribute, "template": template, "cause": cause, "isolate": isolate,
                          "disentangle": _disentangle(cause, isolate), "n_causal": nc, "n_isolate": ni})
        out[mode] = table
    return out


def mode_outputs(method: Any, batch: Mapping[str, Any], modes: Sequence[str]) -> dict[str, Any]:
    """mode -> the method's `eval_batch(batch, mode)` output, through one `eval_modes(batch, modes)` call
    when the method has it (HyperDAS then runs its hypernetwork once for every mode)."""
    modes = tuple(modes)
    if not modes:
        return {}
    if not hasattr(method, "eval_modes"):
        return {mode: method.eval_batch(batch, mode) for mode in modes}
    outs = method.eval_modes(batch, modes)
    if set(outs) != set(modes):
        raise ValueError(f"eval_modes answered modes {sorted(outs)}, asked for {sorted(modes)}")
    return {mode: outs[mode] for mode in modes}


def evaluate(
    method: Any,
    rows: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    modes: Sequence[str] = ("soft", "column_argmax", "bidding_argmax"),
    collate_options: collate.CollateOptions = collate.CollateOptions(),
    n_answer_tokens: int | None = 3,
    baseline: bool = True,
    heatmap_dir: str | os.PathLike | None = None,
    n_heatmaps: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs a method over RAVEL rows in every inference mode and scores it.

    The method is anything with the eval-step interface (`hyperdas_jax.train.HyperDASMethod`, the
    MDAS baseline, a test double):
      name: str
      eval_batch(batch, mode) -> {"correct": (b,) bool, "selection": (b, t_s+1, t_b) float, SELF last,
                                  or None for methods without one (no heatmaps then)}
      baseline_batch(batch) -> {"correct": (b,) bool}   (the target on the base alone)
    and optionally
      eval_modes(batch, modes) -> {mode: eval_batch(batch, mode)}   (several modes at once; used when present)
    where batch is a `collate.collate_batch` dict. "correct" is the method's teacher-forced exact
    match on the first k answer tokens; a method that exposes `n_answer_tokens` (itself or via
    `.steps`) must use the k given here, so results are never labelled with the wrong k.

    Args:
        method: the method to score.
        rows: RAVEL rows (list of dicts or a `datasets.Dataset`).
        tokenizer: the target's fast tokenizer (the one the method's target was trained with).
        modes: inference modes passed to `eval_batch` (or all at once to `eval_modes`).
        collate_options: batching; rows that do not fit are dropped and counted, not scored.
        n_answer_tokens: the k of the exact match (None = every answer token), recorded in the results.
        baseline: also score the "no intervention" pseudo-mode through `baseline_batch`.
        heatmap_dir: if given, PNG heatmaps of A for the first `n_heatmaps` scored rows per mode.
        n_heatmaps: how many rows get heatmaps.
        progress: show a progress bar.

    Returns:
        {"method", "n_answer_tokens", "num_rows", "num_scored", "dropped" (reason -> rows),
        "modes": mode -> scores as in `score_rows` (the "no intervention" entry first) plus
        "disentangle_ci" (95 % stratified bootstrap intervals, `bootstrap.intervals`) and, for
        methods that return a selection, "localisation" (`localisation.summarise` over causal rows), and,
        for rows that carry `base_template`, "templates" (`template_scores`),
        "verdicts": mode -> per-row 1 / 0 / -1 (not scored), "heatmaps": list of written PNG paths}.
    """
    k = _method_answer_tokens(method)
    if k is not _UNSET and k != n_answer_tokens:
        raise ValueError(f"method scores the first {k} answer tokens but n_answer_tokens={n_answer_tokens}")
    rows = as_row_list(rows)
    encoded = collate.encode_rows(rows, tokenizer, collate_options)
    all_modes = ([NO_INTERVENTION] if baseline else []) + list(modes)
    if len(set(all_modes)) != len(all_modes):
        raise ValueError(f"each mode is scored once; got {all_modes}")
    correct = {m: np.full(len(rows), -1, np.int8) for m in all_modes}
    causal_rows = np.array([is_causal(r) for r in rows], bool)
    located: dict[str, dict[str, np.ndarray]] = {}  # mode -> metric -> (len(rows),), NaN unless measured
    wanted = {e.row_index for e in encoded.examples[: max(n_heatmaps, 0)]} if heatmap_dir is not None else set()
    selections: list[tuple[str, int, np.ndarray, dict[str, np.ndarray]]] = []

    n_batches = collate.num_batches(encoded, collate_options)
    batches = collate.iterate_batches(encoded, collate_options)
    for batch in tqdm.tqdm(batches, total=n_batches, desc=f"eval {getattr(method, 'name', 'method')}",
                           unit="batch", disable=not progress):
        valid = np.asarray(batch["valid"], bool)
        index = np.asarray(batch["row_index"])[valid]
        b, tb = batch["base_ids"].shape
        ts = batch["source_ids"].shape[1]
        outputs = {NO_INTERVENTION: method.baseline_batch(batch)} if baseline else {}
        outputs.update(mode_outputs(method, batch, modes))
        for mode, out in outputs.items():
            verdict = np.asarray(out["correct"]).astype(bool)
            if verdict.shape != (b,):
                raise ValueError(f"{mode}: 'correct' has shape {verdict.shape}, expected {(b,)}")
            if (correct[mode][index] >= 0).any():
                raise ValueError(f"{mode}: a row was scored twice")
            correct[mode][index] = verdict[valid]
            if mode == NO_INTERVENTION or out.get("selection") is None:
                continue  # methods without a selection matrix (MDAS) get no heatmaps or localisation
            selection = np.asarray(out["selection"], np.float32)
            if selection.shape != (b, ts + 1, tb):
                raise ValueError(f"{mode}: 'selection' has shape {selection.shape}, expected {(b, ts + 1, tb)}")
            measured = localisation.batch_localisation(selection, batch)
            causal = valid & causal_rows[np.maximum(np.asarray(batch["row_index"]), 0)]
            table = located.setdefault(mode, {m: np.full(len(rows), np.nan) for m in localisation.METRICS})
            for metric, values in measured.items():
                table[metric][np.asarray(batch["row_index"])[causal]] = values[causal]
            for i in np.flatnonzero(valid):
                if int(batch["row_index"][i]) in wanted:
                    fields = {key: np.asarray(batch[key][i]) for key in ("base_ids", "base_mask", "labels",
                                                                         "source_ids", "source_mask")}
                    selections.append((mode, int(batch["row_index"][i]), selection[i], fields))

    scored = correct[all_modes[0]] >= 0 if all_modes else np.zeros(len(rows), bool)
    expected = np.zeros(len(rows), bool)
    expected[[e.row_index for e in encoded.examples]] = True
    for mode, verdict in correct.items():
        if not np.array_equal(verdict >= 0, expected):
            raise ValueError(f"{mode}: scored {(verdict >= 0).sum()} rows, expected {expected.sum()}")
    scores = score_rows(rows, correct)
    for mode, ci in bootstrap.intervals(rows, correct).items():
        scores[mode]["disentangle_ci"] = ci
    for mode, table in located.items():
        scores[mode]["localisation"] = localisation.summarise(rows, table)
    for mode, table in (template_scores(rows, correct) or {}).items():
        scores[mode]["templates"] = table
    results = {
        "method": getattr(method, "name", type(method).__name__),
        "step": getattr(method, "step", None),  # the checkpoint scored, for a trained run
        "averaged": getattr(method, "averaged", 0),  # weights averaged over this many checkpoints (0: as trained)
        "n_answer_tokens": n_answer_tokens,
        "num_rows": len(rows),
        "num_scored": int(scored.sum()),
        "dropped": dict(encoded.dropped),
        "modes": scores,
        "verdicts": {mode: verdict.tolist() for mode, verdict in correct.items()},
        "heatmaps": [],
    }
    if heatmap_dir is not None:
        folder = pathlib.Path(heatmap_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for mode, row_index, selection, fields in selections:
            row = rows[row_index]
            path = folder / f"{mode}_row{row_index}.png"
            title = (f"{results['method']} / {mode} / row {row_index}: {row['edit_instruction']} "
                     f"({row['attribute_type']}, asks {row['attribute']})")
            plot_selection(selection, fields, tokenizer, path, title=title)
            results["heatmaps"].append(str(path))
    return results


def _token_label(tokenizer: Any, token_id: int) -> str:
    text = tokenizer.decode([int(token_id)])
    # Mathtext would parse "$...$"; make whitespace visible so " Paris" and "Paris" differ.
    return text.replace("$", r"\$").replace("\n", "\\n").replace(" ", "·") or "∅"


def selection_grid(
    selection: np.ndarray, fields: Mapping[str, np.ndarray], tokenizer: Any
) -> tuple[np.ndarray, list[str], list[str]]:
    """The part of one example's A worth drawing, with a label per token.

    Only real tokens are kept: the columns are the base prompt's tokens (answer tokens and pads
    left out; nothing is intervened there), the rows the source's real tokens plus SELF. Each token
    id is decoded on its own; a leading space shows as "·".

    Args:
        selection: (t_s+1, t_b) A of one example, SELF row last.
        fields: that example's "base_ids", "base_mask", "labels" (t_b,) and "source_ids",
            "source_mask" (t_s,) from the collated batch.
        tokenizer: decodes the token ids.

    Returns:
        (grid (n_source + 1, n_base), base token labels (n_base,), source labels + "SELF").
    """
    base_cols = np.flatnonzero((fields["base_mask"] == 1) & (fields["labels"] == collate.IGNORE_INDEX))
    src_rows = np.flatnonzero(fields["source_mask"] == 1)
    ts = len(fields["source_ids"])
    grid = selection[np.r_[src_rows, ts]][:, base_cols]
    x_labels = [_token_label(tokenizer, t) for t in fields["base_ids"][base_cols]]
    y_labels = [_token_label(tokenizer, t) for t in fields["source_ids"][src_rows]] + ["SELF"]
    return grid, x_labels, y_labels


def plot_selection(
    selection: np.ndarray,
    fields: Mapping[str, np.ndarray],
    tokenizer: Any,
    path: str | os.PathLike,
    *,
    title: str = "",
) -> pathlib.Path:
    """Writes a PNG heatmap of one example's selection matrix A (axes as in `selection_grid`).

    Args:
        selection: (t_s+1, t_b) A of one example, SELF row last.
        fields: the example's collated arrays, as `selection_grid` takes them.
        tokenizer: decodes the token ids.
        path: output PNG.
        title: figure title.

    Returns:
        The written path.
    """
    # The object API with an explicit Agg canvas: no pyplot global state, no backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid, x_labels, y_labels = selection_grid(selection, fields, tokenizer)
    fig = Figure(figsize=(max(4.0, 0.35 * len(x_labels) + 2.5), max(3.0, 0.3 * len(y_labels) + 2.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(x_labels)), x_labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(y_labels)), y_labels, fontsize=7)
    ax.set_xlabel("base token")
    ax.set_ylabel("source token")
    ax.set_title(title, fontsize=7, wrap=True)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = pathlib.Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs (IPA, CJK) in the default font
        fig.savefig(path, dpi=110)
    return path


def format_pct(value: float | None, *, signed: bool = False) -> str:
    """A score as a percentage with two decimals (a sign too when `signed`, for differences); '-'
    for a score with no rows."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def format_ci(interval: Sequence[float] | None) -> str:
    """A bootstrap interval as percentages, '[lo, hi]'; '-' where there is none."""
    return "-" if interval is None else f"[{format_pct(interval[0])}, {format_pct(interval[1])}]"


def _ci(results: Mapping[str, Any], mode: str, level: str, key: str | None = None) -> str:
    ci = results["modes"][mode].get("disentangle_ci")
    if ci is None:
        return "-"
    return format_ci(ci[level] if key is None else ci[level].get(key))


def _ordered_modes(results: Mapping[str, Any]) -> list[str]:
    modes = list(results["modes"])
    return ([NO_INTERVENTION] if NO_INTERVENTION in modes else []) + [m for m in modes if m != NO_INTERVENTION]


def results_markdown(results: Mapping[str, Any]) -> str:
    """Markdown tables: overall (rows = modes, "no intervention" first), per domain, per attribute.

    Scores are percentages; "-" marks a score with no rows.
    """
    k = results["n_answer_tokens"]
    modes = _ordered_modes(results)
    lines = [
        f"# RAVEL evaluation: {results['method']}"
        + (f" (checkpoint step {results['step']})" if results.get("step") is not None else "")
        + (f" (weights: the mean of {results['averaged']} checkpoints', train.weight_average)"
           if results.get("averaged") else ""),
        "",
        f"Exact match on the {'whole answer' if k is None else f'first {k} answer tokens'} (teacher-forced). "
        f"{results['num_scored']} of {results['num_rows']} rows scored"
        + (f"; dropped: {results['dropped']}" if results["dropped"] else "") + ".",
        "Overall = mean over domains of the mean over attributes; disentangle = (cause + isolate) / 2.",
        "",
        "## Overall",
        "",
        "| mode | cause | isolate | disentangle | 95% CI | pooled cause | pooled isolate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in modes:
        o, p = results["modes"][mode]["overall"], results["modes"][mode]["pooled"]
        lines.append(f"| {mode} | {format_pct(o['cause'])} | {format_pct(o['isolate'])} "
                     f"| {format_pct(o['disentangle'])} | {_ci(results, mode, 'overall')} "
                     f"| {format_pct(p['cause'])} | {format_pct(p['isolate'])} |")
    lines += ["", "## Per domain", "", "| domain | mode | cause | isolate | disentangle | 95% CI |",
              "|---|---|---:|---:|---:|---:|"]
    lines += _breakdown(results, modes, "domains")
    lines += ["", "## Per attribute (the attribute the instruction names)", "",
              "| attribute | mode | cause | isolate | disentangle | causal rows | isolate rows | 95% CI |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += _breakdown(results, modes, "attributes", lambda a: [str(a["n_causal"]), str(a["n_isolate"])])
    lines += template_markdown(results)
    lines += localisation_markdown(results)
    if results.get("heatmaps"):
        lines += ["", "## Selection heatmaps", ""] + [f"- {p}" for p in results["heatmaps"]]
    return "\n".join(lines) + "\n"


def _breakdown(results: Mapping[str, Any], modes: Sequence[str], level: str, extra=lambda scores: []) -> list[str]:
    """Table rows (name, mode, cause, isolate, disentangle, *extra, interval) for every domain or
    attribute (`level`) and mode that has rows."""
    names = sorted({n for m in modes for n in results["modes"][m][level]})
    lines = []
    for name in names:
        for mode in modes:
            scores = results["modes"][mode][level].get(name)
            if scores is not None:
                cells = [name, mode, *(format_pct(scores[k]) for k in ("cause", "isolate", "disentangle")),
                         *extra(scores), _ci(results, mode, level, name)]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def template_markdown(results: Mapping[str, Any]) -> list[str]:
    """The per-base-template table of the intervention modes, or nothing when rows carry no template."""
    modes = [m for m in _ordered_modes(results) if m != NO_INTERVENTION and "templates" in results["modes"][m]]
    if not modes:
        return []
    lines = ["", "## Per base template (the template of the base prompt; no intervention: cause 0, isolate 100)", "",
             "| asks | template | mode | cause | isolate | disentangle | causal rows | isolate rows |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    tables = {m: {(t["attribute"], t["template"]): t for t in results["modes"][m]["templates"]} for m in modes}
    for key in sorted({k for table in tables.values() for k in table}):
        for mode in modes:
            t = tables[mode].get(key)
            if t is not None:
                template = " ".join(t["template"].split()).replace("|", "\\|")
                cells = [t["attribute"], f"`{template}`", mode,
                         *(format_pct(t[k]) for k in ("cause", "isolate", "disentangle")),
                         str(t["n_causal"]), str(t["n_isolate"])]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def localisation_markdown(results: Mapping[str, Any]) -> list[str]:
    """The localisation table (per mode, overall and per attribute), or nothing for methods without A."""
    modes = [m for m in _ordered_modes(results) if "localisation" in results["modes"][m]]
    if not modes:
        return []
    header = " | ".join(localisation.METRICS)
    lines = ["", "## Localisation (causal rows; entity positions used only to read A)", "",
             "Shares of A's non-SELF mass: on the (source entity, base entity) cell, on the source entity's "
             "row, in the base entity's column; SELF weight on the base entity and on the other base tokens; "
             "share of rows with any non-SELF weight. Percentages.", "",
             f"| scope | mode | {header} |", "|---|---|" + "---:|" * len(localisation.METRICS)]
    for mode in modes:
        loc = results["modes"][mode]["localisation"]
        scopes = [("overall", loc["overall"])] + sorted(loc["attributes"].items())
        for scope, values in scopes:
            cells = " | ".join(format_pct(values[m]) for m in localisation.METRICS)
            lines.append(f"| {scope} | {mode} | {cells} |")
    return lines


def save_results(results: Mapping[str, Any], out_dir: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes `results.json` and `results.md` into out_dir (created if needed); returns both paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(results_markdown(results))
    return json_path, md_path
