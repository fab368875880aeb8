"""Finds the entities a target model knows, so RAVEL rows can be drawn from them before filtering.

RAVEL builds one instance per model from entity/prompt pairs the model answers correctly. Drawing
rows from all entities and filtering afterwards wastes most of the filter's forward passes on a
small model: SmolLM2-135M answers two country prompts right for 44 of 600 sampled RAVEL cities, and
a causal row needs it to know two. The screen asks each sampled entity a few train-template prompts per
attribute, with the filter's own teacher-forced check; entities answered right by every screening
prompt form that attribute's pool (`GenerationOptions.entity_pools`). Rows drawn from the pools
still go through `filter_rows`, which stays the only judge of what is kept; sharing the screen's
query cache, it does not rerun the prompts the screen already answered.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Sequence

from hyperdas_jax.data.ravel_filter import FilterOptions, PredictFn, QueryCache, check_queries
from hyperdas_jax.data.ravel_generate import split_template
from hyperdas_jax.data.ravel_raw import RavelDomain, RavelError


@dataclasses.dataclass(frozen=True)
class ScreenOptions:
    """How many entities and prompts the screen spends per attribute.

    Attributes:
        n_entities: entities probed per attribute (at random; all of them when fewer exist).
        n_templates: train templates of the attribute each entity is asked with; an entity joins the
            pool only when it answers all of them right.
        seed: seed of the entity and template draws.
    """

    n_entities: int = 300
    n_templates: int = 2
    seed: int = 42

    def __post_init__(self):
        if self.n_entities < 2 or self.n_templates < 1:
            raise RavelError(f"screen needs n_entities >= 2 and n_templates >= 1, got {self}")


def screen_entities(
    domain: RavelDomain,
    attributes: Sequence[str],
    tokenizer: Any,
    predict_fn: PredictFn,
    filter_options: FilterOptions,
    options: ScreenOptions = ScreenOptions(),
    cache: QueryCache | None = None,
) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Probes entities of each attribute with train-template prompts.

    Args:
        domain: the domain whose "train" templates may be used (pass the copy that excludes
            validation templates, so screening never looks at a held-out prompt).
        attributes: attributes to screen.
        tokenizer, predict_fn, filter_options: as `filter_rows`.
        options: entities and templates per attribute.
        cache: a `check_queries` cache, filled with every probe's answer.

    Returns:
        (pools, report): pools = {attribute: sorted known entities}; report = {attribute: {"probed",
        "known", "templates", "queries", "entities" (the probed ones)}}.
    """
    queries: list[tuple[str, str]] = []
    plan = {}
    for attribute in attributes:
        if attribute not in domain.valued_attributes:
            raise RavelError(f"cannot screen {attribute!r}: it has no values in domain {domain.name!r}")
        rng = random.Random(f"{options.seed}/{domain.name}/{attribute}/screen")
        entities = sorted(e for e in domain.entities("both") if domain.entity_attributes[e].get(attribute, "").strip())
        entities = rng.sample(entities, min(options.n_entities, len(entities)))
        templates = domain.templates(attribute, "train")
        if not templates:
            raise RavelError(f"cannot screen {attribute!r} of {domain.name!r}: it has no train templates")
        templates = rng.sample(templates, min(options.n_templates, len(templates)))
        probes = {e: [("".join(split_template(t, e)), domain.entity_attributes[e][attribute]) for t in templates]
                  for e in entities}
        plan[attribute] = (entities, templates, probes)
        queries.extend(q for qs in probes.values() for q in qs)
    cache = {} if cache is None else cache
    check_queries(queries, tokenizer, predict_fn, filter_options, cache)

    pools, report = {}, {}
    for attribute, (entities, templates, probes) in plan.items():
        pools[attribute] = sorted(e for e in entities if all(cache[q] for q in probes[e]))
        report[attribute] = {"probed": len(entities), "known": len(pools[attribute]), "templates": templates,
                             "queries": sum(map(len, probes.values())), "entities": sorted(entities)}
    return pools, report
