"""Build filtered RAVEL train/validation/test arrow sets for a converted target (tools/prepare_ravel.py).

Splits: train and validation come from RAVEL's train templates, split into two disjoint template
sets (base templates per attribute and entity-bound Wikipedia fragments alike), so validation
measures generalisation to unseen prompts as the test split does; test uses RAVEL's val + test
templates. Entities are shared by all splits (the original's entity_split="both").

With `screen_entities` N, each asked attribute's N sampled entities are first put to the target with
`screen_templates` train prompts; base entities (and the source entities of causal rows) are then
drawn only from those it answered right, so far fewer generated rows fail the filter. The screen's
answers are cached and reused by the filter, which still checks every row.

The target answers in `dtype`, which should be the dtype that later trains and scores on the rows: a
bfloat16 target answers a few percent of base prompts differently from a float32 one, and a row whose
base answer the scoring target gets wrong counts as a failed isolate whatever the intervention does.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import time
from typing import Any

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What to build; the fields are tools/prepare_ravel.py's flags (see its --help)."""

    target: str
    domains: tuple[str, ...]
    out: str
    ravel: str | None = None  # None: the archive packaged with hyperdas_jax
    cache_dir: str | None = None
    attributes: tuple[str, ...] | None = None
    isolate_attributes: tuple[str, ...] | None = None
    n_train: int = 20_000
    n_test: int = 4_000
    validation_fraction: float = 0.1
    filter: str = "strict"
    n_answer_tokens: int | str | None = "auto"  # "auto": 3 for strict, all (None) for original
    screen_entities: int = 0
    screen_templates: int = 2
    batch_size: int = 32
    dtype: str = "float32"  # the target's compute dtype for the screen and the filter ("auto": this machine's)
    seed: int = 42
    overwrite: bool = False
    quiet: bool = False


def hold_out_templates(domain, fraction: float, seed: int):
    """Splits a domain's train templates into train and validation template sets.

    Per attribute, round(fraction * n) of its n train templates (at least 1, at most n - 1) and the
    same fraction of the train-split entity-bound Wikipedia fragments are held out, at random.

    Args:
        domain: a `RavelDomain`.
        fraction: share of train templates held out for validation; 0 = none.
        seed: seed of the draw.

    Returns:
        (train_domain, validation_domain, held) where the two domains are copies of `domain` whose
        "train" templates are the kept and the held-out ones respectively (everything else is
        marked "val", so train generation never sees it), and held = {attribute: [templates],
        "wikipedia": [fragments]}. validation_domain is None when fraction is 0.
    """
    from hyperdas_jax.data.ravel_raw import RavelError, WikipediaFragment

    if fraction == 0:
        return domain, None, {}
    rng = random.Random(f"{seed}/{domain.name}/validation-templates")

    def draw(items: list[str], what: str) -> list[str]:
        if len(items) < 2:
            raise RavelError(f"{domain.name}: {what} has {len(items)} train template(s), too few to hold out "
                             "validation templates (use --validation-fraction 0)")
        n = min(len(items) - 1, max(1, round(fraction * len(items))))
        return sorted(rng.sample(items, n))

    held: dict[str, list[str]] = {}
    for attribute, templates in domain.attribute_templates.items():
        train = [t for t in templates if domain.template_split[t] == "train"]
        if attribute in domain.valued_attributes or len(train) >= 2:
            held[attribute] = draw(train, f"attribute {attribute!r}")
    fragments = [f.template for f in domain.wikipedia if f.entity is not None and f.split == "train"]
    held["wikipedia"] = sorted(rng.sample(fragments, round(fraction * len(fragments))))
    held_templates = {t for a, ts in held.items() if a != "wikipedia" for t in ts}
    held_fragments = set(held["wikipedia"])

    def relabel(keep_held: bool):
        def split_of(split: str, is_held: bool) -> str:
            if split != "train":
                return split
            return "train" if is_held == keep_held else "val"

        template_split = {t: split_of(s, t in held_templates) for t, s in domain.template_split.items()}
        wikipedia = tuple(WikipediaFragment(f.template, split_of(f.split, f.template in held_fragments), f.entity)
                          for f in domain.wikipedia)
        return dataclasses.replace(domain, template_split=template_split, wikipedia=wikipedia)

    return relabel(False), relabel(True), held


def generate_splits(domain, attributes, *, n_train: int, n_test: int, validation_fraction: float, seed: int,
                    entity_pools=None, isolate_attributes=None):
    """Rows of every split for one domain.

    The train templates' n_train rows per attribute are shared out: round(n_train * fraction) to
    validation (held-out templates), the rest to train; test gets n_test rows per attribute from
    RAVEL's val + test templates. Each split draws from its own seed (seed, seed + 1, seed + 2).
    entity_pools and isolate_attributes are passed to every split's `GenerationOptions`.

    Returns:
        ({split: rows}, held-out templates as in `hold_out_templates`).
    """
    from hyperdas_jax.data.ravel_generate import GenerationOptions, generate_rows

    train_domain, val_domain, held = hold_out_templates(domain, validation_fraction, seed)
    n_val = round(n_train * validation_fraction) if val_domain is not None else 0

    def make(source, n, template_split, split_seed):
        options = GenerationOptions(domain.name, target_attributes=attributes, n_per_attribute=n,
                                    template_split=template_split, entity_split="both", seed=split_seed,
                                    entity_pools=entity_pools, isolate_attributes=isolate_attributes)
        return generate_rows(source, options)

    rows = {
        "train": make(train_domain, n_train - n_val, "train", seed),
        "validation": make(val_domain, n_val, "train", seed + 1) if val_domain is not None else [],
        "test": make(domain, n_test, "test", seed + 2),
    }
    return rows, held


def _domain_attributes(domains, wanted: list[str] | None) -> dict[str, tuple[str, ...] | None]:
    """Per domain, the requested attributes it has (None = all valued attributes)."""
    from hyperdas_jax.data.ravel_raw import RavelError

    if not wanted:
        return {d.name: None for d in domains}
    known = {a for d in domains for a in d.attributes}
    unknown = [a for a in wanted if a not in known]
    if unknown:
        choices = "; ".join(f"{d.name}: {', '.join(d.valued_attributes)}" for d in domains)
        raise RavelError(f"unknown attribute(s) {', '.join(map(repr, unknown))}; choose from {choices}")
    out = {}
    for d in domains:
        mine = tuple(a for a in wanted if a in d.attributes)
        if not mine:
            raise RavelError(f"none of the requested attributes belongs to domain {d.name!r}")
        out[d.name] = mine
    return out


def _screen_line(report: dict[str, Any]) -> str:
    screen = report["screen"]
    if not screen["n_entities"]:
        return "- entities: drawn from all (no screen)"
    known = "; ".join(f"{d}: " + ", ".join(f"{a} {r['known']}/{r['probed']}" for a, r in attrs.items())
                      for d, attrs in screen["domains"].items())
    return (f"- entities: screened, {screen['n_entities']} per attribute x {screen['n_templates']} train "
            f"templates, {report['timings']['screen_s']:.1f} s; known: {known}")


def report_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: settings, rows per split, and per split and domain the filter table."""
    from hyperdas_jax.data.ravel_filter import format_report

    f = report["filter"]
    k = "all" if f["n_answer_tokens"] is None else f["n_answer_tokens"]
    lines = [
        "# RAVEL data report",
        "",
        f"- target: `{report['target']}`",
        f"- RAVEL: `{report['ravel']}`",
        f"- domains: {', '.join(report['domains'])}; attributes: {report['attributes'] or 'all with values'}",
        f"- generated per attribute: train templates {report['n_train']} (validation fraction "
        f"{report['validation_fraction']}), test templates {report['n_test']}; seed {report['seed']}",
        f"- filter: rule `{f['rule']}`, " + ("the whole answer" if k == "all" else f"first {k} answer tokens")
        + f"; the target answered in {report_dtype(report)}",
        f"- isolate rows ask: {', '.join(report['isolate_attributes'] or ['every attribute with values'])}",
        _screen_line(report),
        f"- time: {report['timings']['total_s']:.1f} s in all, "
        f"filter {sum(report['timings']['filter_s'].values()):.1f} s",
        "",
        "| split | generated | kept | survival | filter seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for split, s in report["splits"].items():
        survival = s["kept"] / s["generated"] if s["generated"] else 0.0
        lines.append(f"| {split} | {s['generated']} | {s['kept']} | {survival:.1%} | {s['filter_s']:.1f} |")
    for split, s in report["splits"].items():
        for domain, table in s["filter"].items():
            lines += ["", f"## {split} / {domain}", "", "```", format_report(table), "```"]
    return "\n".join(lines) + "\n"


def report_dtype(report: dict[str, Any]) -> str:
    """The dtype a build's target answered in; builds from before the dtype was recorded answered in float32."""
    return report.get("dtype", "float32")


def screened_dtype(split: str | pathlib.Path) -> str | None:
    """The dtype the target answered in when this tool built `split` (a folder beside report.json), or None
    for rows this tool did not build. Builds from before the dtype was recorded answered in float32."""
    report = pathlib.Path(split).parent / "report.json"
    if pathlib.Path(split).name not in SPLITS or not report.is_file():
        return None
    try:
        stored = json.loads(report.read_text())
    except (OSError, ValueError):
        return None
    return report_dtype(stored) if isinstance(stored, dict) else None


def screen_mismatch(split: str | pathlib.Path, dtype: str) -> str | None:
    """A warning when `split`'s rows were screened by the target in a dtype other than `dtype` (the resolved
    dtype that trains or scores on them), else None: rows whose base prompt the screening target answered
    and this one does not count as failed isolates whatever the intervention does."""
    screened = screened_dtype(split)
    if screened is None or screened == dtype:
        return None
    return (f"warning: the rows in {split} were screened by the target in {screened}, and this run's target "
            f"computes in {dtype}: a row whose base prompt it answers differently scores as a failed isolate; "
            f"rebuild them with tools.prepare_ravel --dtype {dtype} to screen in the same dtype")


def build(args: "BuildOptions") -> dict[str, Any]:
    """Generates, filters and writes every split to `args.out`; returns the report.

    Raises RavelError / TargetError on bad input, writing nothing."""
    from hyperdas_jax.atomic import atomic_directory
    from hyperdas_jax.compute_dtype import describe, resolve
    from hyperdas_jax.data import ravel_raw, ravel_store
    from hyperdas_jax.data.ravel_filter import FilterOptions, filter_rows
    from hyperdas_jax.data.ravel_raw import RavelError
    from hyperdas_jax.data.ravel_screen import ScreenOptions, screen_entities
    from hyperdas_jax.data.target_predict import make_predict_fn
    from hyperdas_jax.target import load_target, read_model_config

    start = time.time()
    out = pathlib.Path(args.out)
    if out.exists() and not args.overwrite:
        raise RavelError(f"output folder already exists: {out} (pass --overwrite to replace it)")
    if out.exists() and not (out.is_dir() and (out / "report.json").is_file()):
        raise RavelError(f"{out} holds no report.json: --overwrite only replaces data this tool built; "
                         "choose another --out")
    target_dir = pathlib.Path(args.target)
    read_model_config(target_dir)  # fails fast, before any RAVEL work, on a wrong --target
    if not any((target_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise RavelError(f"target {target_dir} has no tokenizer files")
    k = args.n_answer_tokens
    if k == "auto":
        k = 3 if args.filter == "strict" else None

    ravel = args.ravel if args.ravel is not None else str(ravel_raw.BUNDLED_RAVEL)
    source = ravel_raw.resolve_ravel(ravel, args.cache_dir)
    domains = [ravel_raw.load_domain(source, d) for d in dict.fromkeys(args.domains)]
    attributes = _domain_attributes(domains, args.attributes)
    isolates = _domain_attributes(domains, args.isolate_attributes) if args.isolate_attributes else {}

    t0 = time.time()
    dtype = resolve(args.dtype)
    target = load_target(target_dir, dtype=dtype)
    print(f"the target answers in {describe(args.dtype)}", flush=True)
    if target.tokenizer is None:
        raise RavelError(f"target {target_dir} has no tokenizer")
    predict_fn = make_predict_fn(target)
    load_s = time.time() - t0
    options = FilterOptions(rule=args.filter, n_answer_tokens=k, batch_size=args.batch_size,
                            progress=not args.quiet)
    cache: dict = {}  # every checked (prompt, answer): the screen's probes are not rerun by the filter

    pools, screen = {}, {}
    t0 = time.time()
    if args.screen_entities:
        screen_options = ScreenOptions(n_entities=args.screen_entities, n_templates=args.screen_templates,
                                       seed=args.seed)
        for domain in domains:
            asked = isolates.get(domain.name) or domain.valued_attributes
            wanted = dict.fromkeys([*(attributes[domain.name] or domain.valued_attributes), *asked])
            train_domain, _, _ = hold_out_templates(domain, args.validation_fraction, args.seed)
            print(f"screening {domain.name}: {args.screen_entities} entities x {args.screen_templates} "
                  f"train templates for {', '.join(wanted)}", flush=True)
            pools[domain.name], screen[domain.name] = screen_entities(
                train_domain, list(wanted), target.tokenizer, predict_fn, options, screen_options, cache)
            for attribute, r in screen[domain.name].items():
                print(f"  {attribute}: knows {r['known']} of {r['probed']}", flush=True)
    screen_s = time.time() - t0

    t0 = time.time()
    rows = {s: {} for s in SPLITS}
    held = {}
    for domain in domains:
        per_split, held[domain.name] = generate_splits(
            domain, attributes[domain.name], n_train=args.n_train, n_test=args.n_test,
            validation_fraction=args.validation_fraction, seed=args.seed,
            entity_pools=pools.get(domain.name), isolate_attributes=isolates.get(domain.name))
        for split in SPLITS:
            rows[split][domain.name] = per_split[split]
    generated_s = time.time() - t0
    print(f"generated {', '.join(f'{s} {sum(map(len, rows[s].values()))}' for s in SPLITS)} rows "
          f"in {generated_s:.1f}s", flush=True)

    kept: dict[str, list] = {}
    splits: dict[str, Any] = {}
    filter_s: dict[str, float] = {}
    for split in SPLITS:
        kept[split], tables, t0 = [], {}, time.time()
        for domain in domains:
            todo = rows[split][domain.name]
            print(f"filtering {split}/{domain.name}: {len(todo)} rows", flush=True)
            survivors, tables[domain.name] = filter_rows(todo, target.tokenizer, predict_fn, options, cache)
            kept[split].extend(survivors)
        filter_s[split] = time.time() - t0
        splits[split] = {"generated": sum(len(r) for r in rows[split].values()), "kept": len(kept[split]),
                         "filter_s": filter_s[split], "filter": tables}
        if not kept[split]:
            print(f"warning: no {split} row survived the filter", flush=True)

    report = {
        "target": str(target_dir),
        "ravel": str(ravel),
        "domains": [d.name for d in domains],
        "attributes": args.attributes,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "validation_fraction": args.validation_fraction,
        "seed": args.seed,
        "isolate_attributes": args.isolate_attributes,
        "filter": {"rule": args.filter, "n_answer_tokens": k, "batch_size": args.batch_size},
        "dtype": dtype,
        "screen": {"n_entities": args.screen_entities, "n_templates": args.screen_templates, "domains": screen,
                   "pools": pools},
        "validation_templates": held,
        "splits": splits,
        "timings": {"generate_s": generated_s, "load_target_s": load_s, "screen_s": screen_s,
                    "filter_s": filter_s},
    }

    with atomic_directory(out) as tmp:
        for split in SPLITS:
            generated = [r for d in domains for r in rows[split][d.name]]
            ravel_store.save_rows(kept[split], tmp / split, columns=list(generated[0]) if generated else ())
        report["timings"]["total_s"] = time.time() - start
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(report_markdown(report))
    return report
