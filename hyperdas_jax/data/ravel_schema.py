"""The HyperDAS RAVEL row schema (13 string columns) and the few rules read off a row."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from hyperdas_jax.data.ravel_raw import RavelError

# Column order of the original HyperDAS arrow folders; every value is a string.
ROW_COLUMNS = (
    "input_prefix",
    "input_suffix",
    "counterfactual_input_prefix",
    "counterfactual_input_suffix",
    "edit_instruction",
    "entity",
    "counterfactual_entity",
    "target",
    "counterfactual_target",
    "attribute_type",
    "domain",
    "attribute",
    "verify_text",
)

# Optional columns this port adds. The templates make split checks and per-template scoring
# possible; the types say whether a prompt came from a RAVEL template or a Wikipedia fragment.
TEMPLATE_COLUMNS = ("base_template", "source_template", "base_template_type", "source_template_type")

ATTRIBUTE_TYPES = ("causal", "isolate")


def is_causal(row: Mapping[str, str]) -> bool:
    """True for a causal row (answer = source's value), False for an isolate row (base's value)."""
    kind = row["attribute_type"]
    if kind not in ATTRIBUTE_TYPES:
        raise RavelError(f"attribute_type must be 'causal' or 'isolate', got {kind!r}")
    return kind == "causal"


def expected_answer(row: Mapping[str, str]) -> str:
    """The answer the intervened target should give on the base prompt."""
    return row["counterfactual_target"] if is_causal(row) else row["target"]


def instruction_attribute(row: Mapping[str, str]) -> str:
    """The attribute named in the edit instruction (the intervened one).

    For causal rows it equals `row["attribute"]`; for isolate rows `row["attribute"]` is the one the
    base prompt asks about, which the intervention must leave alone.
    """
    return row["edit_instruction"].rsplit(" - ", 1)[-1]


def as_row_list(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Materialises rows from a list, any iterable of mappings, or a `datasets.Dataset`."""
    to_list = getattr(rows, "to_list", None)
    if callable(to_list):  # datasets.Dataset: one columnar read instead of per-row decoding
        return to_list()
    return [dict(r) for r in rows]
