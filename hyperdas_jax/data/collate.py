"""Encodes HyperDAS RAVEL rows and collates them into fixed-shape, left-padded numpy batches."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from hyperdas_jax.data import ravel_tokens
from hyperdas_jax.data.ravel_raw import RavelError
from hyperdas_jax.data.ravel_schema import as_row_list, expected_answer, is_causal

IGNORE_INDEX = -100
DEFAULT_LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128)
DEFAULT_EDITOR_BUCKETS = (16, 32, 64)


def validate_buckets(name: str, buckets: Sequence[int]) -> tuple[int, ...]:
    """Checks that a bucket list is strictly ascending positive lengths and returns it as a tuple."""
    buckets = tuple(int(b) for b in buckets)
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise RavelError(f"{name} must be strictly ascending positive lengths, got {buckets}")
    return buckets


@dataclasses.dataclass(frozen=True)
class CollateOptions:
    """How rows become batches.

    Attributes:
        batch_size: rows per batch, fixed; the last partial batch is filled up with `valid=False` rows.
        length_buckets: allowed Tb and Ts, ascending; a batch takes the smallest that fits.
        editor_buckets: allowed Te, ascending.
        max_length: longest base or source sequence kept (BOS and answer included); None = the
            largest length bucket. Longer rows are dropped and counted, never truncated, so no
            answer token is cut silently.
        base_suffix_visible: let the hypernetwork intervene on base suffix tokens (original: False).
        source_suffix_visible: same for the source suffix (original: False).
        pad_id: override of the tokenizer's pad id (default: pad token, else EOS).
    """

    batch_size: int = 16
    length_buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS
    editor_buckets: tuple[int, ...] = DEFAULT_EDITOR_BUCKETS
    max_length: int | None = None
    base_suffix_visible: bool = False
    source_suffix_visible: bool = False
    pad_id: int | None = None

    def __post_init__(self):
        for name in ("length_buckets", "editor_buckets"):
            object.__setattr__(self, name, validate_buckets(name, getattr(self, name)))
        if self.batch_size < 1:
            raise RavelError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length is not None and not 1 <= self.max_length <= self.length_buckets[-1]:
            raise RavelError(f"max_length must be in [1, {self.length_buckets[-1]}], got {self.max_length}")

    @property
    def length_limit(self) -> int:
        return self.length_buckets[-1] if self.max_length is None else self.max_length


@dataclasses.dataclass(frozen=True)
class EncodedExample:
    """One row as unpadded token ids (all with their single leading BOS).

    Attributes:
        editor_ids: BOS + instruction.
        base_ids: BOS + base prompt + answer.
        base_prompt_len: number of leading base_ids that are not answer (BOS included).
        base_n_suffix: base suffix tokens (just before the answer).
        base_entity: index in base_ids of the entity's last token.
        source_ids: BOS + source prompt.
        source_n_suffix: source suffix tokens (at the end).
        source_entity: index in source_ids of the source entity's last token.
        is_causal: causal (True) or isolate (False).
        row_index: index of the row in the encoded input.
        editor_anchors: indices in editor_ids of the last token of the base and of the source entity's
            name in the instruction ("{base} ; {source} - {attribute}"); (-1, -1) for another form.
    """

    editor_ids: tuple[int, ...]
    base_ids: tuple[int, ...]
    base_prompt_len: int
    base_n_suffix: int
    base_entity: int
    source_ids: tuple[int, ...]
    source_n_suffix: int
    source_entity: int
    is_causal: bool
    row_index: int
    editor_anchors: tuple[int, int] = (-1, -1)


@dataclasses.dataclass(frozen=True)
class EncodedRows:
    """The kept examples of a row set plus what was dropped and why.

    Attributes:
        examples: kept examples, in input order.
        dropped: reason -> number of rows ("base_too_long", "source_too_long",
            "editor_too_long", "empty_answer").
        num_rows: number of input rows.
        pad_id: pad id used when collating.
    """

    examples: tuple[EncodedExample, ...]
    dropped: Mapping[str, int]
    num_rows: int
    pad_id: int


def encode_rows(rows: Iterable[Mapping[str, Any]], tokenizer: Any, options: CollateOptions) -> EncodedRows:
    """Tokenises every row once and drops (and counts) rows that do not fit.

    Args:
        rows: HyperDAS RAVEL rows (list of dicts or a `datasets.Dataset`).
        tokenizer: a fast HF tokenizer with a BOS token.
        options: collation options (lengths, buckets, pad id).

    Returns:
        The encoded examples and drop counts.
    """
    rows = as_row_list(rows)
    bos = ravel_tokens.bos_id(tokenizer)
    pad = ravel_tokens.pad_id(tokenizer) if options.pad_id is None else options.pad_id
    base_prompts = ravel_tokens.encode_prompts(
        tokenizer, [r["input_prefix"] for r in rows], [r["input_suffix"] for r in rows]
    )
    source_prompts = ravel_tokens.encode_prompts(
        tokenizer,
        [r["counterfactual_input_prefix"] for r in rows],
        [r["counterfactual_input_suffix"] for r in rows],
    )
    answers = ravel_tokens.encode_answers(
        tokenizer, [r["input_prefix"] + r["input_suffix"] for r in rows], [expected_answer(r) for r in rows]
    )
    instructions = ravel_tokens.encode_texts(tokenizer, [r["edit_instruction"] for r in rows])
    anchors = ravel_tokens.instruction_anchors(tokenizer, [r["edit_instruction"] for r in rows])

    limit = options.length_limit
    dropped: collections.Counter[str] = collections.Counter()
    examples = []
    for i, (row, base, source, answer, instruction, anchor) in enumerate(
        zip(rows, base_prompts, source_prompts, answers, instructions, anchors, strict=True)
    ):
        base_ids = (bos, *base.ids, *answer)
        source_ids = (bos, *source.ids)
        editor_ids = (bos, *instruction)
        if not answer:
            dropped["empty_answer"] += 1
        elif len(base_ids) > limit:
            dropped["base_too_long"] += 1
        elif len(source_ids) > limit:
            dropped["source_too_long"] += 1
        elif len(editor_ids) > options.editor_buckets[-1]:
            dropped["editor_too_long"] += 1
        else:
            examples.append(
                EncodedExample(
                    editor_ids=editor_ids,
                    base_ids=base_ids,
                    base_prompt_len=1 + len(base.ids),
                    base_n_suffix=base.n_suffix,
                    base_entity=1 + base.entity_index,
                    source_ids=source_ids,
                    source_n_suffix=source.n_suffix,
                    source_entity=1 + source.entity_index,
                    is_causal=is_causal(row),
                    row_index=i,
                    editor_anchors=tuple(1 + a if a >= 0 else -1 for a in anchor),
                )
            )
    return EncodedRows(tuple(examples), dict(dropped), len(rows), pad)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length."""
    for b in buckets:
        if b >= length:
            return b
    raise RavelError(f"sequence of {length} tokens exceeds the largest bucket {buckets[-1]}")


def collate_batch(
    examples: Sequence[EncodedExample], options: CollateOptions, pad_id: int
) -> dict[str, np.ndarray]:
    """Left-pads up to `options.batch_size` examples into one fixed-shape batch.

    Every sequence is left-padded with the pad id and starts with exactly one BOS; positions index
    the padded arrays. Te, Tb, Ts (editor, base, source lengths) are each the smallest bucket that
    fits the batch, so jit sees only a handful of shapes. Position ids are left to the model, which
    derives them from the masks.

    Args:
        examples: 1..batch_size encoded examples.
        options: collation options.
        pad_id: pad token id.

    Returns:
        A dict of numpy arrays (B = options.batch_size):
        editor_ids               (B, Te) int32  BOS + edit_instruction
        editor_mask              (B, Te) int32  1 on real tokens
        base_ids                 (B, Tb) int32  BOS + prefix + suffix + answer
        base_mask                (B, Tb) int32  1 on real tokens
        base_intervention_mask   (B, Tb) int32  base_mask without the answer tokens and, unless
                                                base_suffix_visible, without the suffix tokens
        labels                   (B, Tb) int32  answer ids at their own positions, -100 elsewhere
                                                (unshifted, HF style: logits at t-1 predict labels[t])
        source_ids               (B, Ts) int32  BOS + cf_prefix + cf_suffix
        source_mask              (B, Ts) int32  1 on real tokens
        source_intervention_mask (B, Ts) int32  source_mask without the cf suffix tokens unless
                                                source_suffix_visible
        base_memory_index        (B, Wb) int32  positions of each row's base_intervention_mask tokens,
                                                in order, then -1; Wb the smallest length bucket that
                                                holds the batch's most (see `visible_index`)
        source_memory_index      (B, Ws) int32  the same for source_intervention_mask
        base_entity_pos          (B,)    int32  position of the base entity's last token
        source_entity_pos        (B,)    int32  position of the source entity's last token
        base_anchor_pos          (B,)    int32  position in editor_ids of the base entity name's last
                                                token (EncodedExample.editor_anchors); -1 if none
        source_anchor_pos        (B,)    int32  the same for the source entity's name
        is_causal                (B,)    bool   causal row (answer = source's value); else isolate
        valid                    (B,)    bool   False on filler rows of the last partial batch
        row_index                (B,)    int32  index of the row in the encoded rows; -1 on filler
    """
    n, size = len(examples), options.batch_size
    if not 1 <= n <= size:
        raise RavelError(f"collate_batch needs 1..{size} examples, got {n}")
    te = bucket_length(max(len(e.editor_ids) for e in examples), options.editor_buckets)
    tb = bucket_length(max(len(e.base_ids) for e in examples), options.length_buckets)
    ts = bucket_length(max(len(e.source_ids) for e in examples), options.length_buckets)

    def full(shape, value, dtype=np.int32):
        return np.full(shape, value, dtype=dtype)

    batch = {
        "editor_ids": full((size, te), pad_id),
        "editor_mask": full((size, te), 0),
        "base_ids": full((size, tb), pad_id),
        "base_mask": full((size, tb), 0),
        "base_intervention_mask": full((size, tb), 0),
        "labels": full((size, tb), IGNORE_INDEX),
        "source_ids": full((size, ts), pad_id),
        "source_mask": full((size, ts), 0),
        "source_intervention_mask": full((size, ts), 0),
        "base_entity_pos": full((size,), 0),
        "source_entity_pos": full((size,), 0),
        "base_anchor_pos": full((size,), -1),
        "source_anchor_pos": full((size,), -1),
        "is_causal": full((size,), False, bool),
        "valid": full((size,), False, bool),
        "row_index": full((size,), -1),
    }
    for i in range(size):
        # Filler rows repeat the first example rather than being all padding: a row with no
        # attendable token would give NaNs in attention. `valid` keeps them out of losses/metrics.
        e = examples[i] if i < n else examples[0]
        if i < n:
            batch["valid"][i] = True
            batch["row_index"][i] = e.row_index
        batch["is_causal"][i] = e.is_causal

        off = te - len(e.editor_ids)
        batch["editor_ids"][i, off:] = e.editor_ids
        batch["editor_mask"][i, off:] = 1
        for key, anchor in zip(("base_anchor_pos", "source_anchor_pos"), e.editor_anchors):
            batch[key][i] = off + anchor if anchor >= 0 else -1

        off = tb - len(e.base_ids)
        prompt_end = off + e.base_prompt_len
        batch["base_ids"][i, off:] = e.base_ids
        batch["base_mask"][i, off:] = 1
        batch["labels"][i, prompt_end:] = e.base_ids[e.base_prompt_len :]
        visible_end = prompt_end if options.base_suffix_visible else prompt_end - e.base_n_suffix
        batch["base_intervention_mask"][i, off:visible_end] = 1
        batch["base_entity_pos"][i] = off + e.base_entity

        off = ts - len(e.source_ids)
        batch["source_ids"][i, off:] = e.source_ids
        batch["source_mask"][i, off:] = 1
        visible_end = ts if options.source_suffix_visible else ts - e.source_n_suffix
        batch["source_intervention_mask"][i, off:visible_end] = 1
        batch["source_entity_pos"][i] = off + e.source_entity
    batch["base_memory_index"] = visible_index(batch["base_intervention_mask"], options.length_buckets)
    batch["source_memory_index"] = visible_index(batch["source_intervention_mask"], options.length_buckets)
    return batch


def visible_index(mask: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """(b, w) int32: each row's positions where `mask` (b, t) is nonzero, in order, then -1.

    w is the smallest bucket that holds the row with the most, capped at t. The hypernetwork's
    memory gathers only these tokens' states (hyperdas_jax/models/hypernet.py `visible_states`): a
    batch whose prompts are padded to 48 positions but show the hypernetwork at most 31 tokens gives
    it 31·(n+1) memory entries per row padded to 32·(n+1), not 48·(n+1).
    """
    mask = np.asarray(mask) > 0
    b, t = mask.shape
    counts = mask.sum(axis=1)
    longest = int(counts.max()) if b else 0
    width = min(t, next((w for w in buckets if w >= longest), t))
    out = np.full((b, max(width, 1)), -1, np.int32)
    for i in range(b):
        where = np.flatnonzero(mask[i])
        out[i, : len(where)] = where
    return out


def num_batches(encoded: EncodedRows, options: CollateOptions, *, drop_remainder: bool = False) -> int:
    """How many batches `iterate_batches` yields."""
    full_batches, rest = divmod(len(encoded.examples), options.batch_size)
    return full_batches + (1 if rest and not drop_remainder else 0)


def iterate_batches(
    encoded: EncodedRows,
    options: CollateOptions,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_remainder: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields collated batches over the encoded examples.

    Args:
        encoded: output of `encode_rows`.
        options: collation options (must be the ones used for `encode_rows`).
        shuffle: visit examples in a permutation drawn from `seed` (pass e.g. base_seed + epoch
            for a new order each epoch); otherwise in input order.
        seed: permutation seed.
        drop_remainder: skip the last partial batch instead of filling it with invalid rows.

    Yields:
        Batches as described in `collate_batch`.
    """
    order = np.arange(len(encoded.examples))
    if shuffle:
        order = np.random.default_rng(seed).permutation(order)
    for b in range(num_batches(encoded, options, drop_remainder=drop_remainder)):
        chunk = order[b * options.batch_size : (b + 1) * options.batch_size]
        yield collate_batch([encoded.examples[j] for j in chunk], options, encoded.pad_id)
