"""Where a selection matrix A puts its weight, measured against the rows' entity positions.

The method never sees the entity positions; the evaluator uses them only to read A. A selection
that localises moves the source entity's (last) token into the base entity's (last) token and
keeps every other base token (SELF). Per causal row, over the visible (intervention-mask) cells:

  entity_share    A[source entity, base entity] / all non-SELF mass   (1 = all of it on the entity pair)
  source_share    mass on the source entity's row / all non-SELF mass   (the source side localises)
  base_share      mass in the base entity's column / all non-SELF mass  (the base side localises)
  self_entity     A[SELF, base entity]                                  (0 = the entity is patched)
  self_other      mean of A[SELF, j] over the other visible base tokens (1 = nothing else is patched)
  intervened      1 if any non-SELF weight is left (hard modes: any patched position)

The shares are undefined for a row with no non-SELF weight (None there, left out of the means).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from hyperdas_jax.data.ravel_schema import instruction_attribute

METRICS = ("entity_share", "source_share", "base_share", "self_entity", "self_other", "intervened")
_EPS = 1e-6


def batch_localisation(selection: np.ndarray, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The METRICS for every example of a collated batch: (b,) float arrays (NaN where undefined).

    Args:
        selection: (b, t_s+1, t_b) A, SELF row last.
        batch: the collated batch (`base_intervention_mask`, `source_intervention_mask`,
            `base_entity_pos`, `source_entity_pos`).
    """
    a = np.asarray(selection, np.float64)
    b = a.shape[0]
    rows = np.arange(b)
    base_iv = np.asarray(batch["base_intervention_mask"]) > 0  # (b, j)
    src_iv = np.asarray(batch["source_intervention_mask"]) > 0  # (b, i)
    base_ent, src_ent = np.asarray(batch["base_entity_pos"]), np.asarray(batch["source_entity_pos"])
    pair = a[:, :-1] * (src_iv[:, :, None] & base_iv[:, None, :])  # (b, i, j)
    total = pair.sum(axis=(1, 2))
    has = total > _EPS
    share = lambda x: np.where(has, x / np.where(has, total, 1.0), np.nan)  # noqa: E731
    others = base_iv.copy()
    others[rows, base_ent] = False
    self_row = a[:, -1]
    return {
        "entity_share": share(pair[rows, src_ent, base_ent]),
        "source_share": share(pair[rows, src_ent].sum(axis=-1)),
        "base_share": share(pair[rows, :, base_ent].sum(axis=-1)),
        "self_entity": self_row[rows, base_ent],
        "self_other": (self_row * others).sum(-1) / np.maximum(others.sum(-1), 1),
        "intervened": has.astype(np.float64),
    }


def _nanmean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def summarise(rows: Sequence[Mapping[str, Any]], per_row: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Means of the METRICS over causal rows, per attribute and overall (mean over attributes).

    Args:
        rows: the evaluated rows.
        per_row: metric -> (len(rows),) values, NaN where a row was not scored, is an isolate row
            or the metric is undefined.

    Returns:
        {"overall": {metric: mean or None}, "attributes": {"<domain>/<attribute>": {metric: mean or
        None, "n_rows": causal rows}}}.
    """
    keys = np.array([f"{r['domain']}/{instruction_attribute(r)}" for r in rows])
    counted = ~np.isnan(per_row["intervened"])
    attributes = {}
    for key in sorted(set(keys[counted])):
        mine = (keys == key) & counted
        attributes[key] = {m: _nanmean(per_row[m][mine]) for m in METRICS} | {"n_rows": int(mine.sum())}
    overall = {}
    for m in METRICS:
        present = [a[m] for a in attributes.values() if a[m] is not None]
        overall[m] = sum(present) / len(present) if present else None
    return {"overall": overall, "attributes": attributes}
