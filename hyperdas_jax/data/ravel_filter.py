"""Keeps only RAVEL rows the un-intervened target model gets right (teacher-forced argmax check)."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import tqdm

from hyperdas_jax.data import ravel_tokens
from hyperdas_jax.data.collate import DEFAULT_LENGTH_BUCKETS, bucket_length, validate_buckets
from hyperdas_jax.data.ravel_raw import RavelError
from hyperdas_jax.data.ravel_schema import as_row_list, expected_answer, is_causal

PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
RULES = ("strict", "original")
_COUNTS = ("generated", "too_long", "failed_a", "failed_b", "failed_c", "kept")


@dataclasses.dataclass(frozen=True)
class FilterOptions:
    """How rows are checked.

    Attributes:
        rule: "strict" = checks (a), (b), (c); "original" = check (b) only.
        n_answer_tokens: compare the first k answer tokens; None = all of them (the original).
        batch_size: rows per predict_fn call, fixed (the last batch is filled with repeats).
        length_buckets: allowed sequence lengths T, ascending; queries longer than the largest
            cannot be checked and their rows are removed as "too_long".
        progress: show a tqdm progress bar.
    """

    rule: str = "strict"
    n_answer_tokens: int | None = None
    batch_size: int = 32
    length_buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS
    progress: bool = True

    def __post_init__(self):
        if self.rule not in RULES:
            raise RavelError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.n_answer_tokens is not None and self.n_answer_tokens < 1:
            raise RavelError(f"n_answer_tokens must be >= 1 or None, got {self.n_answer_tokens}")
        object.__setattr__(self, "length_buckets", validate_buckets("length_buckets", self.length_buckets))
        if self.batch_size < 1:
            raise RavelError(f"batch_size must be >= 1, got {self.batch_size}")


def _first_k(ids: list[int], k: int | None) -> list[int]:
    return ids if k is None else ids[:k]


QueryCache = dict  # (prompt, answer) -> bool | None, shared by calls with one target, tokenizer and options


def check_queries(
    queries: list[tuple[str, str]],
    tokenizer: Any,
    predict_fn: PredictFn,
    options: FilterOptions,
    cache: QueryCache | None = None,
) -> list[bool | None]:
    """Teacher-forced check of (prompt, answer) pairs: does the target's argmax reproduce the answer?

    Args:
        queries: (prompt, answer) strings, tokenised as the rows they come from are.
        tokenizer, predict_fn, options: as `filter_rows`.
        cache: answers of earlier calls with the same target, tokenizer and options; pairs found
            there are not run again, and new answers are added to it.

    Returns:
        Per query: True / False, or None where prompt + answer is too long to check.
    """
    if cache is None:
        return _run_queries(queries, tokenizer, predict_fn, options)
    todo = list(dict.fromkeys(q for q in queries if q not in cache))
    cache.update(zip(todo, _run_queries(todo, tokenizer, predict_fn, options)))
    return [cache[q] for q in queries]


def _run_queries(
    queries: list[tuple[str, str]], tokenizer: Any, predict_fn: PredictFn, options: FilterOptions
) -> list[bool | None]:
    """Teacher-forced check of each (prompt, answer) pair; None where it is too long to check."""
    if not queries:
        return []
    bos = ravel_tokens.bos_id(tokenizer)
    pad = ravel_tokens.pad_id(tokenizer)
    prompts = ravel_tokens.encode_texts(tokenizer, [p for p, _ in queries])
    answers = ravel_tokens.encode_answers(tokenizer, [p for p, _ in queries], [a for _, a in queries])
    results: list[bool | None] = [None] * len(queries)
    checkable = []
    for q, (prompt, answer) in enumerate(zip(prompts, answers)):
        if not answer:
            results[q] = False  # an empty answer can never be reproduced
        elif 1 + len(prompt) + len(answer) <= options.length_buckets[-1]:
            checkable.append(q)
    # Sorting by length puts similar lengths together, so most batches use the same small bucket.
    checkable.sort(key=lambda q: (len(prompts[q]) + len(answers[q]), q))
    size = options.batch_size
    starts = range(0, len(checkable), size)
    for start in tqdm.tqdm(starts, desc="RAVEL filter", unit="batch", disable=not options.progress):
        chunk = checkable[start : start + size]
        seqs = [[bos, *prompts[q], *answers[q]] for q in chunk]
        t = bucket_length(max(len(s) for s in seqs), options.length_buckets)
        ids = np.full((size, t), pad, np.int32)
        mask = np.zeros((size, t), np.int32)
        for i in range(size):
            seq = seqs[i] if i < len(seqs) else seqs[0]  # filler rows repeat a real one
            ids[i, t - len(seq) :] = seq
            mask[i, t - len(seq) :] = 1
        pred = np.asarray(predict_fn(ids, mask))
        if pred.shape != (size, t):
            raise RavelError(f"predict_fn returned shape {pred.shape}, expected {(size, t)}")
        for i, q in enumerate(chunk):
            answer = _first_k(answers[q], options.n_answer_tokens)
            first = t - len(answers[q])  # position of the first answer token
            # The prediction at position p is the model's guess for token p + 1.
            guessed = pred[i, first - 1 : first - 1 + len(answer)]
            results[q] = bool(np.array_equal(guessed, answer))
    return results


def filter_rows(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    predict_fn: PredictFn,
    options: FilterOptions = FilterOptions(),
    cache: QueryCache | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Filters rows by what the un-intervened target model answers.

    The target is any `predict_fn(input_ids, attention_mask) -> next-token argmax`, all int32 of
    shape (B, T), inputs left-padded; the callee derives position ids from the mask. Prompts and
    answers are tokenised exactly as `collate.encode_rows` does (see `ravel_tokens`), so a kept row
    is checked on the very token ids it is later trained and scored on.

    Checks per row (k = options.n_answer_tokens; None = every answer token):
      (a) the target answers the base prompt (prefix + suffix) with the base entity's own value
          `target` (first k tokens);
      (b) the target answers `verify_text` with the expected answer (causal: `counterfactual_target`,
          verify_text = base template filled with the source entity; isolate: `target` on the base
          prompt), first k tokens;
      (c) causal rows only: `target` and `counterfactual_target` differ in their first k answer
          tokens, else the intervention's effect would be invisible.
    rule="strict" (default) keeps a row iff it passes (a), (b) and (c). rule="original" applies only
    (b), which is what the HyperDAS `filter_dataset` did. It never checked that the model knows the
    base entity's value on a causal row, so a causal row can count as a success when the model
    already answers the base prompt with the source's value, intervention or not.

    Args:
        rows: HyperDAS RAVEL rows (list of dicts or a `datasets.Dataset`).
        tokenizer: the target's fast HF tokenizer.
        predict_fn: (input_ids (B, T) int32, attention_mask (B, T) int32) -> argmax next-token
            ids (B, T) int32; inputs are left-padded.
        options: rule, k, batching.
        cache: see `check_queries`; checks already answered there (by an entity screen or an
            earlier split) cost no forward pass.

    Returns:
        (kept rows in input order, report). The report maps "causal/<attribute>",
        "isolate/<attribute>" and "total" to counts: generated, too_long, failed_a, failed_b,
        failed_c (each check counted on its own: a row may fail several; None = check not
        applied), kept, survival (kept / generated). `format_report` prints it as a table.
    """
    rows = as_row_list(rows)
    strict = options.rule == "strict"
    k = options.n_answer_tokens

    # Identical (prompt, answer) pairs are run once: an isolate row's (a) and (b) coincide.
    query_index: dict[tuple[str, str], int] = {}

    def query(prompt: str, answer: str) -> int:
        return query_index.setdefault((prompt, answer), len(query_index))

    wanted = []
    for row in rows:
        base_prompt = row["input_prefix"] + row["input_suffix"]
        check_a = query(base_prompt, row["target"]) if strict else None
        check_b = query(row["verify_text"], expected_answer(row))
        wanted.append((check_a, check_b))
    outcome = check_queries(list(query_index), tokenizer, predict_fn, options, cache)

    causal = [is_causal(r) for r in rows]
    distinct = [True] * len(rows)
    if strict:
        prompts = [r["input_prefix"] + r["input_suffix"] for r in rows]
        own = ravel_tokens.encode_answers(tokenizer, prompts, [r["target"] for r in rows])
        other = ravel_tokens.encode_answers(tokenizer, prompts, [r["counterfactual_target"] for r in rows])
        distinct = [_first_k(a, k) != _first_k(b, k) if c else True for a, b, c in zip(own, other, causal)]

    report: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    kept = []
    for row, c, (check_a, check_b), ok_c in zip(rows, causal, wanted, distinct):
        ok_a = outcome[check_a] if check_a is not None else True
        ok_b = outcome[check_b]
        counts = report[f"{row['attribute_type']}/{row['attribute']}"]
        counts["generated"] += 1
        if ok_a is None or ok_b is None:
            counts["too_long"] += 1
            continue
        counts["failed_a"] += not ok_a
        counts["failed_b"] += not ok_b
        counts["failed_c"] += not ok_c
        if ok_a and ok_b and ok_c:
            counts["kept"] += 1
            kept.append(row)

    total: collections.Counter = collections.Counter()
    for counts in report.values():
        total.update(counts)
    out = {}
    for key, counts in [*sorted(report.items()), ("total", total)]:
        entry: dict[str, Any] = {name: counts[name] for name in _COUNTS}
        if not strict:
            entry["failed_a"] = entry["failed_c"] = None
        entry["survival"] = counts["kept"] / counts["generated"] if counts["generated"] else 0.0
        out[key] = entry
    return kept, out


def format_report(report: Mapping[str, Mapping[str, Any]]) -> str:
    """Renders a `filter_rows` report as a fixed-width text table."""
    columns = (*_COUNTS, "survival")
    width = max([len("group"), *(len(k) for k in report)])
    lines = [f"{'group':<{width}}  " + "  ".join(f"{c:>9}" for c in columns)]
    for key, entry in report.items():
        cells = []
        for c in columns:
            value = entry[c]
            cells.append("-" if value is None else f"{value:.1%}" if c == "survival" else str(value))
        lines.append(f"{key:<{width}}  " + "  ".join(f"{v:>9}" for v in cells))
    lines.append("(a) base prompt -> base value; (b) verify_text -> expected answer; "
                 "(c) causal values differ in tokens; a row may fail several checks")
    return "\n".join(lines)
