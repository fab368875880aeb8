"""Turns RAVEL prompts and answers into token ids, the same way for the model filter and collation."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from hyperdas_jax.data.ravel_raw import RavelError

# Conventions (the filter's verdict only transfers to training if both use exactly these):
# - Text is always tokenised with `add_special_tokens=False` and exactly one BOS id
#   (`tokenizer.bos_token_id`) is put in front by the caller. This gives one BOS whether or not the
#   tokenizer adds one itself (SmolLM2 does not; Hub Llama-3 tokenizers do), avoiding the original's
#   double BOS.
# - A prompt (prefix + suffix) is tokenised as one string, so the target model sees the natural
#   tokenisation of the whole prompt. Character offsets tell which tokens belong to the suffix and
#   which token ends the entity.
# - An answer is tokenised on its own, as `sep + answer` with `sep = " "` unless the prompt ends in
#   a space, `"`, `'` or `(` (the original's rule), and its ids are appended after the prompt's ids.
#   Tokenising prompt + answer together would not keep the prompt's ids as a prefix when the
#   prompt ends in a space (byte-level BPE tokenises "in " as [in, Ġ] but "in Paris" as
#   [in, ĠParis]), and the label boundary would shift. Separate tokenisation is exact for byte-level
#   BPE tokenizers (Llama-3, SmolLM2, GPT-2). SentencePiece tokenizers that prepend a dummy "▁"
#   (Llama-2) would need the original's "0"-prefix trick; they are not supported here.
_NO_SEPARATOR_AFTER = (" ", '"', "'", "(")


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """A tokenised prompt, without BOS.

    Attributes:
        ids: token ids of prefix + suffix.
        entity_index: index in `ids` of the entity's last token (the last token starting inside
            the prefix; it can run on into the suffix when the tokenizer merges across the split).
        n_suffix: number of tokens that start inside the suffix (counted without special tokens).
    """

    ids: tuple[int, ...]
    entity_index: int
    n_suffix: int


def bos_id(tokenizer: Any) -> int:
    """The BOS id every sequence starts with; tokenizers without one are rejected."""
    if tokenizer.bos_token_id is None:
        raise RavelError(f"tokenizer {type(tokenizer).__name__} has no bos_token_id")
    return int(tokenizer.bos_token_id)


def pad_id(tokenizer: Any) -> int:
    """The pad id (the EOS id when the tokenizer defines no pad token, as for Llama-3)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise RavelError(f"tokenizer {type(tokenizer).__name__} has neither pad_token_id nor eos_token_id")


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's default call puts BOS in front by itself (Hub Llama-3 style)."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def answer_separator(prompt: str) -> str:
    """The text put between prompt and answer: " " unless the prompt ends in space, quote or "("."""
    return "" if prompt.endswith(_NO_SEPARATOR_AFTER) else " "


def _unique(items: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """Distinct items in first-seen order, and each item's index among them."""
    index: dict[Any, int] = {}
    where = [index.setdefault(item, len(index)) for item in items]
    return list(index), where


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if not texts:
        return []
    # Tokenising costs ~0.1 ms a text on a small CPU; RAVEL repeats answers and prompts a lot.
    distinct, where = _unique(texts)
    encoded = tokenizer(distinct, add_special_tokens=False)["input_ids"]
    return [list(encoded[w]) for w in where]


def encode_answers(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]) -> list[list[int]]:
    """Token ids of each answer as it follows its prompt (separator rule included)."""
    return encode_texts(tokenizer, [answer_separator(p) + a for p, a in zip(prompts, answers, strict=True)])


def encode_prompts(tokenizer: Any, prefixes: Sequence[str], suffixes: Sequence[str]) -> list[EncodedPrompt]:
    """Tokenises prefix + suffix as one text and locates the entity end and the suffix tokens.

    Args:
        tokenizer: a fast (Rust-backed) HF tokenizer; offsets are needed.
        prefixes: prompt texts up to and including the entity.
        suffixes: the rest of each prompt.

    Returns:
        One EncodedPrompt per prompt.
    """
    if not prefixes:
        return []
    distinct, where = _unique(list(zip(prefixes, suffixes, strict=True)))
    try:
        enc = tokenizer([p + s for p, s in distinct], add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise RavelError("RAVEL collation needs a fast tokenizer (token offsets)") from e
    encoded = []
    for (prefix, _), ids, offsets in zip(distinct, enc["input_ids"], enc["offset_mapping"]):
        boundary = len(prefix)
        # A byte-level token inside a multi-byte character shares that character's offsets, so
        # "starts before the boundary" still picks the entity's very last token.
        in_prefix = [i for i, (start, _) in enumerate(offsets) if start < boundary]
        if not in_prefix:
            raise RavelError(f"no token found for the entity in prompt {prefix!r}")
        entity_index = in_prefix[-1]
        encoded.append(EncodedPrompt(tuple(ids), entity_index, len(ids) - entity_index - 1))
    return [encoded[w] for w in where]


def instruction_anchors(tokenizer: Any, instructions: Sequence[str]) -> list[tuple[int, int]]:
    """Where each concept description names its two entities, as token indices (without BOS).

    A RAVEL edit instruction reads "{base entity} ; {source entity} - {attribute}"; the anchors are
    the indices, in the instruction's own tokens (tokenised as `encode_texts` does), of the last
    token of the base name and of the source name. (-1, -1) for an instruction of another form.
    They come from the instruction text alone, which the method reads at inference, never from
    the prompts' entity positions.
    """
    if not instructions:
        return []
    distinct, where = _unique(list(instructions))
    try:
        enc = tokenizer(distinct, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise RavelError("instruction anchors need a fast tokenizer (token offsets)") from e

    def last_token(offsets, end: int) -> int:
        """The last token starting before character `end`: the one holding the name's last character."""
        return max((i for i, (start, _) in enumerate(offsets) if start < end), default=-1)

    anchors = []
    for text, offsets in zip(distinct, enc["offset_mapping"]):
        base_end, source_end = text.find(" ; "), text.rfind(" - ")
        if base_end < 1 or source_end < base_end + 4:  # both names need at least one character
            anchors.append((-1, -1))
        else:
            anchors.append((last_token(offsets, base_end), last_token(offsets, source_end)))
    return [anchors[w] for w in where]
