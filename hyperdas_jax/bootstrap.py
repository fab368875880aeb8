"""Bootstrap confidence intervals for RAVEL scores (disentangle per attribute, domain and overall).

RAVEL test sets hold a few hundred rows, so a few points of disentangle can be noise. The
bootstrap here is stratified: rows are resampled with replacement within each (attribute, causal
or isolate) group, so every replicate keeps the test set's make-up (the same number of causal and
isolate rows per attribute) and is aggregated exactly as `evaluate.score_rows` aggregates (cause
and isolate per attribute, plain means over attributes, then over domains). All modes, and all
methods scored on the same rows, share one set of resampled rows, so the difference of two
methods' replicates is a paired bootstrap of their difference.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from hyperdas_jax.data.ravel_schema import instruction_attribute, is_causal

N_BOOT = 2000
LEVEL = 0.95


def _mean(arrays: Sequence[np.ndarray | None]) -> np.ndarray | None:
    present = [a for a in arrays if a is not None]
    return sum(present) / len(present) if present else None


def replicates(rows: Sequence[Mapping[str, Any]], correct: Mapping[str, np.ndarray], *, n_boot: int = N_BOOT,
               seed: int = 0) -> dict[str, dict[str, Any]]:
    """Bootstrap replicates of every disentangle figure, per mode.

    Args:
        rows: the evaluated rows (need `domain`, `attribute_type`, `edit_instruction`).
        correct: mode -> (len(rows),) int verdicts: 1 correct, 0 wrong, -1 not scored; every mode
            scores the same rows (as `evaluate` guarantees).
        n_boot: number of replicates; 0 gives the point estimate itself (every row once), shape (1,).
        seed: resampling seed; the same seed resamples the same rows.

    Returns:
        mode -> {"overall": (n_boot,), "domains": {domain: (n_boot,)}, "attributes": {"<domain>/<attribute>":
        (n_boot,)}} disentangle replicates, as fractions.
    """
    modes = list(correct)
    if not modes:
        return {}
    scored = np.asarray(correct[modes[0]]) >= 0
    groups: dict[tuple[str, str, bool], list[int]] = {}
    for i, row in enumerate(rows):
        if scored[i]:
            groups.setdefault((row["domain"], instruction_attribute(row), is_causal(row)), []).append(i)
    # Per group, in sorted order, (n_boot, n_group) multiplicities: how often each row is drawn in every
    # replicate; one group's draws at a time, shared by every mode (memory: n_boot x the largest group).
    rng = np.random.default_rng(seed)
    hits = {mode: (np.asarray(correct[mode]) == 1).astype(np.float64) for mode in modes}
    rates: dict[str, dict[tuple[str, str, bool], np.ndarray]] = {mode: {} for mode in modes}
    for key, idx in sorted(groups.items()):
        n = len(idx)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) if n_boot else np.ones((1, n))
        for mode in modes:
            rates[mode][key] = weights @ hits[mode][idx] / n  # (n_boot,)
    out = {}
    for mode in modes:
        rate = rates[mode]
        attributes = {}
        for domain, attribute in sorted({(d, a) for d, a, _ in groups}):
            attributes[f"{domain}/{attribute}"] = (domain, rate.get((domain, attribute, True)),
                                                   rate.get((domain, attribute, False)))
        domains = {}
        for domain in sorted({d for d, _, _ in attributes.values()}):
            mine = [v for v in attributes.values() if v[0] == domain]
            domains[domain] = (_mean([c for _, c, _ in mine]), _mean([i for _, _, i in mine]))
        cause, isolate = _mean([c for c, _ in domains.values()]), _mean([i for _, i in domains.values()])
        out[mode] = {"overall": _mean([cause, isolate]),
                     "domains": {d: _mean(list(ci)) for d, ci in domains.items()},
                     "attributes": {k: _mean([c, i]) for k, (_, c, i) in attributes.items()}}
    return out


def interval(samples: np.ndarray | None, level: float = LEVEL) -> list[float] | None:
    """The percentile interval [lo, hi] of bootstrap samples (None for a score with no rows)."""
    if samples is None:
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return [float(lo), float(hi)]


def intervals(rows: Sequence[Mapping[str, Any]], correct: Mapping[str, np.ndarray], *, n_boot: int = N_BOOT,
              seed: int = 0, level: float = LEVEL) -> dict[str, dict[str, Any]]:
    """mode -> {"overall": [lo, hi], "domains": {d: [lo, hi]}, "attributes": {key: [lo, hi]}} of disentangle."""
    return {mode: {"overall": interval(r["overall"], level),
                   "domains": {d: interval(v, level) for d, v in r["domains"].items()},
                   "attributes": {k: interval(v, level) for k, v in r["attributes"].items()}}
            for mode, r in replicates(rows, correct, n_boot=n_boot, seed=seed).items()}


def difference(rows: Sequence[Mapping[str, Any]], a: np.ndarray, b: np.ndarray, *, n_boot: int = N_BOOT,
               seed: int = 0, level: float = LEVEL) -> dict[str, float | list[float]]:
    """Overall disentangle of verdicts `a` minus that of `b` on the same rows, with its paired interval.

    Returns:
        {"difference": point estimate, "interval": [lo, hi]}; a difference whose interval holds 0
        is not a measured win.
    """
    verdicts = {"a": a, "b": b}
    point = replicates(rows, verdicts, n_boot=0)
    reps = replicates(rows, verdicts, n_boot=n_boot, seed=seed)
    return {"difference": float(point["a"]["overall"][0] - point["b"]["overall"][0]),
            "interval": interval(reps["a"]["overall"] - reps["b"]["overall"], level)}
