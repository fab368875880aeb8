"""Disentangle against intervention layer, HyperDAS and MDAS trained and scored per layer on one RAVEL
attribute (tools/sweep_layers.py). Layers already scored are skipped on a rerun."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

METHODS = ("HyperDAS", "MDAS")


class SweepError(ValueError):
    """Bad sweep input: missing data, layers outside the target."""


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """What to sweep; the fields are tools/sweep_layers.py's flags (see its --help)."""

    data: str
    config: str = "configs/smollm2_ravel.yaml"
    target: str | None = None
    attribute: str = "Country"
    layers: tuple[int, ...] | None = None
    split: str = "validation"
    steps: int = 80
    mode: str = "soft"
    set: tuple[str, ...] = ()
    out: str = "reports/sweep_layers"
    no_progress: bool = False


def attribute_rows(path: pathlib.Path, attribute: str) -> list[dict]:
    """Rows of an arrow split whose edit instruction names `attribute` (its causal and isolate rows)."""
    from hyperdas_jax.data.ravel_schema import instruction_attribute
    from hyperdas_jax.data.ravel_store import load_rows

    rows = [r for r in load_rows(path) if instruction_attribute(r) == attribute]
    if not rows:
        raise ValueError(f"{path} has no rows for attribute {attribute!r}")
    return rows


def default_layers(n_layers: int) -> list[int]:
    """Five layers spread over the model: every (n // 5)-th, starting half a stride in (3, 9, ... for 30)."""
    stride = max(1, n_layers // 5)
    return list(range(stride // 2, n_layers, stride))


def layer_config(base, layer: int, train_dir: pathlib.Path, overrides: list[str]):
    from hyperdas_jax.config import apply_overrides, from_dict, to_dict, ExperimentConfig

    cfg = from_dict(ExperimentConfig, apply_overrides(to_dict(base), [f"intervention.layer={layer}", *overrides]))
    # The sweep scores each run itself; the loop's own end-of-training evaluation would repeat it.
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=str(train_dir), validation=None,
                                                             test=None))


def run_layer(layer: int, cfg_base, args, train_dir: pathlib.Path, eval_rows: list[dict], target) -> dict:
    """Trains and scores both methods at one layer; returns {method: overall scores} (fractions)."""
    from hyperdas_jax import loop
    from hyperdas_jax.checkpoint import load_trained_method
    from hyperdas_jax.data.collate import CollateOptions
    from hyperdas_jax.data.ravel_store import load_rows
    from hyperdas_jax.evaluate import evaluate, save_results
    from hyperdas_jax.mdas import TRAIN_OVERRIDES, row_task_ids, train_mdas

    out = pathlib.Path(args.out) / f"layer_{layer}"
    results = {}
    for name in METHODS:
        where = out / name.lower()
        done = where / "eval" / "results.json"
        if done.is_file():
            scored = json.loads(done.read_text())
        else:
            extra = list(TRAIN_OVERRIDES) if name == "MDAS" else []
            cfg = layer_config(cfg_base, layer, train_dir, extra)
            start = time.time()
            print(f"layer {layer}: training {name} ({cfg.train.steps} steps)", flush=True)
            if name == "HyperDAS":
                result = loop.train(cfg, where / "run", resume="auto", progress=not args.no_progress)
                if result.status != "finished":  # preempted: never score a half-trained run
                    raise SystemExit(f"layer {layer}: HyperDAS training stopped early ({result.status}); "
                                     "rerun the same command to resume")
                method = load_trained_method(where / "run", step="latest")
                modes = (args.mode,)
            else:
                where.mkdir(parents=True, exist_ok=True)
                method = train_mdas(target.model, cfg, load_rows(train_dir), target.tokenizer,
                                    metrics_path=where / "metrics.jsonl", progress=not args.no_progress)
                method = method.with_rows(row_task_ids(eval_rows, method.tasks)[0])
                modes = ("soft",)
            trained_s = time.time() - start
            scored = evaluate(method, eval_rows, target.tokenizer, modes=modes,
                              collate_options=CollateOptions(batch_size=cfg.eval.batch_size),
                              n_answer_tokens=cfg.eval.n_answer_tokens, progress=not args.no_progress)
            scored["seconds"] = {"train": trained_s, "evaluate": time.time() - start - trained_s}
            save_results(scored, where / "eval")
        mode = args.mode if name == "HyperDAS" else "soft"
        results[name] = scored["modes"][mode]["overall"]
        results["no intervention"] = scored["modes"]["no intervention"]["overall"]
    return results


def sweep_markdown(sweep: dict) -> str:
    from hyperdas_jax.evaluate import format_pct as pct

    lines = [f"# Layer sweep: {sweep['attribute']}, {sweep['split']} split ({sweep['n_rows']} rows)", "",
             f"Target `{sweep['target']}`; {sweep['steps']} training steps per method and layer; HyperDAS in "
             f"{sweep['mode']} mode. Scores in %: cause / isolate / disentangle.", "",
             "| layer | HyperDAS cause | HyperDAS isolate | HyperDAS disentangle "
             "| MDAS cause | MDAS isolate | MDAS disentangle |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for layer, r in sweep["layers"].items():
        h, m = r["HyperDAS"], r["MDAS"]
        lines.append(f"| {layer} | {pct(h['cause'])} | {pct(h['isolate'])} | {pct(h['disentangle'])} "
                     f"| {pct(m['cause'])} | {pct(m['isolate'])} | {pct(m['disentangle'])} |")
    base = next(iter(sweep["layers"].values()))["no intervention"] if sweep["layers"] else None
    if base:
        lines += ["", f"No intervention: cause {pct(base['cause'])}, isolate {pct(base['isolate'])}, "
                      f"disentangle {pct(base['disentangle'])}."]
    return "\n".join(lines) + "\n"


def plot_sweep(sweep: dict, path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [int(k) for k in sweep["layers"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, style in zip(METHODS, ("o-", "s--")):
        ys = [100 * (r[name]["disentangle"] or 0.0) for r in sweep["layers"].values()]
        ax.plot(layers, ys, style, label=name)
    ax.set_xlabel("intervention layer L (patches hs[L])")
    ax.set_ylabel("disentangle (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{sweep['attribute']}, {sweep['split']} split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_layers(args: SweepOptions) -> dict:
    """Trains and scores both methods at every layer; writes sweep.{json,md,png} under `args.out`
    after each layer and returns the sweep. Raises SweepError / ConfigError / TargetError on bad input."""
    from hyperdas_jax.config import load_config
    from hyperdas_jax.data import ravel_store
    from hyperdas_jax.evaluate import format_pct
    from hyperdas_jax.target import load_target

    data = pathlib.Path(args.data)
    for split in ("train", args.split):
        if not (data / split).is_dir():
            raise SweepError(f"{data / split} does not exist (build it with tools/prepare_ravel.py)")
    overrides = [f"train.steps={args.steps}"]
    if args.target:
        overrides.append(f"target.path={args.target}")
    cfg = load_config(args.config, overrides + list(args.set))
    target = load_target(cfg.target.path)
    n_layers = target.model.config.num_hidden_layers
    layers = args.layers or default_layers(n_layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise SweepError(f"layers {bad} outside [0, {n_layers - 1}] for this target")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_dir = out / "data" / f"train_{args.attribute}"
    if not train_dir.is_dir():
        ravel_store.save_rows(attribute_rows(data / "train", args.attribute), train_dir)
    eval_rows = attribute_rows(data / args.split, args.attribute)
    sweep = {"attribute": args.attribute, "split": args.split, "n_rows": len(eval_rows), "mode": args.mode,
             "target": str(cfg.target.path), "steps": args.steps, "layers": {}}
    for layer in layers:  # in the order given; the table, plot and JSON list layers ascending
        r = run_layer(layer, cfg, args, train_dir, eval_rows, target)
        sweep["layers"] = dict(sorted({**sweep["layers"], str(layer): r}.items(), key=lambda kv: int(kv[0])))
        print(f"layer {layer}: disentangle HyperDAS {format_pct(r['HyperDAS']['disentangle'])}, "
              f"MDAS {format_pct(r['MDAS']['disentangle'])}", flush=True)
        # Written after every layer, so an interrupted sweep still shows what it has.
        (out / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
        (out / "sweep.md").write_text(sweep_markdown(sweep))
        plot_sweep(sweep, out / "sweep.png")
    return sweep
