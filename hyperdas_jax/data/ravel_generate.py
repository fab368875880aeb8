"""Generates HyperDAS RAVEL rows (causal and isolate interchange examples) from a raw domain."""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Mapping, Sequence

from hyperdas_jax.data.ravel_raw import RavelDomain, RavelError, SPLIT_GROUPS, load_domain

_ENTITY_SPLITS = ("both", "train", "test")


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """What to generate for one domain.

    Attributes:
        domain: RAVEL domain name.
        target_attributes: attributes to intervene on; None = every attribute with values
            (occupation's value-less "Gender Bias" is skipped). Names as in RAVEL's JSON.
        n_per_attribute: rows per target attribute: half causal, half isolate spread evenly
            over the other valued attributes (the original used 20,000 train / 4,000 test).
        template_split: "train" = RAVEL train templates; "test" = RAVEL val + test templates.
        entity_split: "both" (all entities, as the original), "train", or "test" (= val + test).
        seed: seed of all sampling; each target attribute gets its own stream, so a target's rows
            do not depend on which other targets are generated alongside.
        include_template_columns: add the template and template-type columns to every row.
        entity_pools: optional {attribute: entities}: rows whose base prompt asks that attribute
            draw their base entity, and for causal rows also their source entity, from the pool
            (a target model's known entities, see `ravel_screen`); other attributes draw from all.
        isolate_attributes: attributes isolate rows may ask; None = every valued attribute (the
            original). A target attribute is never its own isolate.
    """

    domain: str
    target_attributes: tuple[str, ...] | None = None
    n_per_attribute: int = 20_000
    template_split: str = "train"
    entity_split: str = "both"
    seed: int = 42
    include_template_columns: bool = True
    entity_pools: Mapping[str, Sequence[str]] | None = None
    isolate_attributes: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.isolate_attributes is not None:
            object.__setattr__(self, "isolate_attributes", tuple(self.isolate_attributes))
        if self.entity_pools is not None:
            object.__setattr__(self, "entity_pools", {a: tuple(es) for a, es in self.entity_pools.items()})
        if self.target_attributes is not None:
            object.__setattr__(self, "target_attributes", tuple(self.target_attributes))
        if self.template_split not in SPLIT_GROUPS:
            raise RavelError(f"template_split must be one of {tuple(SPLIT_GROUPS)}, got {self.template_split!r}")
        if self.entity_split not in _ENTITY_SPLITS:
            raise RavelError(f"entity_split must be one of {_ENTITY_SPLITS}, got {self.entity_split!r}")
        if self.n_per_attribute < 0:
            raise RavelError(f"n_per_attribute must be >= 0, got {self.n_per_attribute}")


def split_template(template: str, entity: str) -> tuple[str, str]:
    """Fills the `%s` slot and splits the text right after the entity.

    The original splits at the *last occurrence* of the entity string in the filled text. That is
    the slot in almost every case, but not when the entity string reappears later in the template
    (verb "die" inside "audience", city "Wa" inside "Wang Sai Phun": about 0.01-0.2% of
    template/entity pairs), where it cut words apart. Splitting at the slot keeps the intended
    property, that the prefix ends with the entity mention.

    Returns:
        (prefix, suffix) with prefix ending in `entity` and prefix + suffix the filled template.
    """
    slot = template.index("%s")
    return template[:slot] + entity, template[slot + 2 :]


def _differing_pair(
    rng: random.Random, bases: list[str], sources: list[str], values: dict[str, str]
) -> tuple[str, str]:
    """Draws base and source entities until their values differ (the original's redraw rule)."""
    while True:
        base, source = rng.choice(bases), rng.choice(sources)
        if values[base] != values[source]:
            return base, source


class _Sampler:
    """Per-domain lookup tables shared by every target attribute of one generation call."""

    def __init__(self, domain: RavelDomain, options: GenerationOptions):
        self.domain = domain
        self.options = options
        entities = domain.entities(options.entity_split)
        self.values = {
            a: {e: domain.entity_attributes[e].get(a, "") for e in entities} for a in domain.valued_attributes
        }
        # Entities with an empty value (two Nobel winners have only "") cannot carry that attribute.
        self.candidates = {a: [e for e, v in vals.items() if v.strip()] for a, vals in self.values.items()}
        # Base (and causal source) entities of prompts asking attribute a: its pool when one is given.
        self.pools = dict(self.candidates)
        for a, pool in (options.entity_pools or {}).items():
            if a not in self.values:
                raise RavelError(f"entity_pools names {a!r}, which has no values in domain {domain.name!r}")
            unknown = sorted(set(pool) - set(self.candidates[a]))
            if unknown:
                raise RavelError(f"entity_pools[{a!r}] has entities without a value in {options.entity_split!r}: "
                                 f"{', '.join(unknown[:5])}")
            self.pools[a] = sorted(set(pool))
        self.base_templates = {a: domain.templates(a, options.template_split) for a in domain.attributes}
        # Source prompts may come from any attribute's templates, valued or not.
        self.source_attributes = [a for a in domain.attributes if self.base_templates[a]]
        wanted = SPLIT_GROUPS[options.template_split]
        self.wikipedia: dict[str, list[str]] = {}
        for fragment in domain.wikipedia:
            if fragment.entity is not None and fragment.split in wanted:
                self.wikipedia.setdefault(fragment.entity, []).append(fragment.template)

    def check_attribute(self, attribute: str) -> None:
        if attribute not in self.values:
            raise RavelError(
                f"attribute {attribute!r} has no values in domain {self.domain.name!r}; "
                f"choose from {', '.join(self.domain.valued_attributes)}"
            )
        if not self.base_templates[attribute]:
            raise RavelError(
                f"attribute {attribute!r} of {self.domain.name!r} has no {self.options.template_split} templates"
            )
        if len({self.values[attribute][e] for e in self.pools[attribute]}) < 2:
            pooled = attribute in (self.options.entity_pools or {})
            where = "its entity pool" if pooled else f"entity split {self.options.entity_split!r}"
            raise RavelError(
                f"attribute {attribute!r} of {self.domain.name!r} needs two entities with different values in {where}"
            )

    def source_prompt(self, rng: random.Random, source: str) -> tuple[str, str]:
        """Source template: a random attribute's template, or, with probability 1/(|attrs|+1) when
        the entity has one, one of its own Wikipedia fragments. Returns (template, type)."""
        fragments = self.wikipedia.get(source, ())
        pick = rng.randrange(len(self.source_attributes) + (1 if fragments else 0))
        if pick == len(self.source_attributes):
            return rng.choice(fragments), "wikipedia"
        return rng.choice(self.base_templates[self.source_attributes[pick]]), "template"

    def row(self, rng: random.Random, intervened: str, queried: str) -> dict[str, str]:
        """One row: causal when `queried == intervened`, else isolate for attribute `queried`."""
        values = self.values[queried]
        causal = queried == intervened
        pool = self.pools[queried]
        base, source = _differing_pair(rng, pool, pool if causal else self.candidates[queried], values)
        base_template = rng.choice(self.base_templates[queried])
        source_template, source_type = self.source_prompt(rng, source)
        prefix, suffix = split_template(base_template, base)
        cf_prefix, cf_suffix = split_template(source_template, source)
        verify_text = "".join(split_template(base_template, source)) if causal else prefix + suffix
        row = {
            "input_prefix": prefix,
            "input_suffix": suffix,
            "counterfactual_input_prefix": cf_prefix,
            "counterfactual_input_suffix": cf_suffix,
            "edit_instruction": f"{base} ; {source} - {intervened}",
            "entity": base,
            "counterfactual_entity": source,
            "target": values[base],
            "counterfactual_target": values[source],
            "attribute_type": "causal" if causal else "isolate",
            "domain": self.domain.name,
            "attribute": queried,
            "verify_text": verify_text,
        }
        if self.options.include_template_columns:
            row.update(
                base_template=base_template,
                source_template=source_template,
                base_template_type="template",
                source_template_type=source_type,
            )
        return row


def generate_rows(source: RavelDomain | str | os.PathLike, options: GenerationOptions) -> list[dict[str, str]]:
    """Generates causal and isolate rows for each target attribute.

    For target attribute A: n/2 causal rows (base prompt asks A, answer = source's A value) and
    n/2 isolate rows split evenly over the other attributes B of `options.isolate_attributes` (default:
    every valued attribute; base prompt asks B, answer =
    base's own B value). Every instruction names A. Base and source are redrawn until their values
    of the attribute the base prompt asks differ. Rows come out grouped by target, causal first.

    Args:
        source: a loaded RavelDomain (must match options.domain) or a RAVEL path/URL to load from.
        options: what to generate.

    Returns:
        n_per_attribute * len(targets) rows, each a dict of strings (ROW_COLUMNS, plus
        TEMPLATE_COLUMNS when options.include_template_columns).
    """
    if isinstance(source, RavelDomain):
        domain = source
        if domain.name != options.domain:
            raise RavelError(f"options ask for domain {options.domain!r} but got {domain.name!r}")
    else:
        domain = load_domain(source, options.domain)
    sampler = _Sampler(domain, options)
    targets = options.target_attributes
    if targets is None:
        targets = domain.valued_attributes
    asked = domain.valued_attributes if options.isolate_attributes is None else options.isolate_attributes
    for attribute in (*targets, *asked):
        if attribute not in domain.attribute_templates:
            raise RavelError(
                f"unknown attribute {attribute!r} for domain {domain.name!r}; known: {', '.join(domain.attributes)}"
            )
    for attribute in targets:
        sampler.check_attribute(attribute)

    rows: list[dict[str, str]] = []
    for target in targets:
        rng = random.Random(f"{options.seed}/{domain.name}/{target}")
        isolates = [a for a in asked if a != target]
        n = options.n_per_attribute
        n_causal = n // 2 if isolates else n
        rows.extend(sampler.row(rng, target, target) for _ in range(n_causal))
        # Spread the isolate half evenly; the first attributes take the remainder, one each.
        n_isolate, extra = divmod(n - n_causal, max(len(isolates), 1))
        for i, queried in enumerate(isolates):
            sampler.check_attribute(queried)
            rows.extend(sampler.row(rng, target, queried) for _ in range(n_isolate + (i < extra)))
    return rows
