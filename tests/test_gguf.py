"""GGUF llama conversion checked against transformers' own GGUF loader and llama.cpp's Q/K permutation."""

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from hyperdas_jax.convert.errors import ConversionError
from hyperdas_jax.convert.gguf_llama import (
    find_smollm2_gguf,
    gguf_hf_config,
    gguf_tokenizer,
    iter_gguf_tensors,
    open_gguf,
)


@pytest.fixture(scope="module")
def reader(smollm2_gguf):
    return open_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    """SmolLM2 as transformers loads it from the GGUF, in float32.

    `from_pretrained(folder, gguf_file=...)` refuses to run without accelerate, which is no
    dependency of ours; for llama it builds the model from the GGUF config and fills it from
    `load_gguf_checkpoint(..., model_to_load=model)`, so we make those same two calls.
    """
    config = transformers.AutoConfig.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    with torch.device("meta"):  # skips a random init that the GGUF weights overwrite anyway
        model = transformers.LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.float().eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def tokenizer(reader):
    return gguf_tokenizer(reader)


def test_find_smollm2_gguf(smollm2_gguf):
    assert find_smollm2_gguf() == smollm2_gguf


def _llamacpp_permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf Q/K permutation (HF rows -> GGUF rows), frozen here as the reference."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def test_tensors_match_transformers(reader, hf_model):
    ref = hf_model.state_dict()
    seen = set()
    for name, w in iter_gguf_tensors(reader):
        assert w.dtype == np.float32 and w.shape == tuple(ref[name].shape), name
        np.testing.assert_allclose(w, ref[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
        seen.add(name)
    # SmolLM2 ties lm_head to the embedding, so the file has no output.weight and we yield no lm_head.
    assert seen == set(ref) - {"lm_head.weight"}
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()


def test_qk_unpermutation_inverts_llamacpp(reader):
    """Independent of transformers: re-permuting our q/k the llama.cpp way gives back the file's rows."""
    heads = {"self_attn.q_proj": 9, "self_attn.k_proj": 3}
    raw = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors if t.name.startswith("blk.0.")}
    for name, w in iter_gguf_tensors(reader):
        for proj, n in heads.items():
            if name == f"model.layers.0.{proj}.weight":
                gguf_rows = raw["blk.0.attn_q.weight" if "q_proj" in proj else "blk.0.attn_k.weight"]
                np.testing.assert_array_equal(_llamacpp_permute(w, n), gguf_rows)
                assert not np.array_equal(w, gguf_rows)  # the permutation is not a no-op here
        if name.startswith("model.layers.1."):
            break


def test_config_matches_transformers(reader, hf_model):
    ours, ref = gguf_hf_config(reader), hf_model.config
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
        "hidden_act", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
    ):  # fmt: skip
        assert ours[key] == getattr(ref, key), key
    # Both hold the file's float32; we write its shortest decimal (1e-05), transformers the double.
    assert np.float32(ours["rms_norm_eps"]) == np.float32(ref.rms_norm_eps)
    assert ours["rope_parameters"]["rope_type"] == ref.rope_parameters["rope_type"] == "default"
    assert np.float32(ours["rope_parameters"]["rope_theta"]) == np.float32(ref.rope_parameters["rope_theta"])
    assert (ours["vocab_size"], ours["hidden_size"], ours["num_hidden_layers"]) == (49152, 576, 30)
    assert (ours["rms_norm_eps"], ours["rope_parameters"]["rope_theta"]) == (1e-5, 100000.0)
    built = transformers.LlamaConfig(**ours)
    assert built.num_key_value_heads == 3 and built.tie_word_embeddings


_TEXTS = [
    "city to country: Paris is in the country of",
    "city to country: Bangkok is in the country of",
    '[{"city": "Bangkok", "lat": "13.8"}, {"city": "',
    '[{"city": "Paris", "country": "France"}, {"city": "Tokyo", "country": "',
    "The continent of Nairobi is",
    "Hello, world!",
    "hello world 123  ok",
    "x  1",
    "a   2024 and 3.14159, -42, 1e-5, 0x1F",
    "Café, naïve, résumé, Ångström, Straße, jalapeño",
    "Zürich und München liegen in",
    "東京は日本の首都です。",
    "北京是中国的首都",
    "서울은 한국의 수도입니다",
    "مرحبا بالعالم، القاهرة عاصمة مصر",
    "Москва — столица России",
    "Αθήνα είναι η πρωτεύουσα",
    "नई दिल्ली भारत की राजधानी है",
    "emoji 😀🎉👍🏽 and 🇫🇷 flags, family 👨‍👩‍👧",
    "½ ² ③ Ⅻ ٣ numerals",
    "tabs\tand\ttabs",
    "line one\nline two\n\nline four",
    "windows\r\nnewlines\r\n",
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "\n",
    "",
    "<|im_start|>user\nWhere is Paris?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more text",
    "<repo_name>hyperdas<file_sep>main.py",
    "<|im_start|> spaced <|im_end|>",
    "don't, won't, I'll, we've, they're, she's, I'm, he'd",
    "DON'T SHOUT",
    "def f(x):\n    return x ** 2  # square\n",
    "{'key': [1, 2, 3], \"other\": null}",
    "https://example.com/path?query=1&b=2#frag",
    "user@example.com",
    "a\u00a0non-breaking\u2009thin\u3000ideographic space",
    "zero\u200bwidth\u200djoiner",
    "The quick brown fox jumps over the lazy dog.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "!!!???...---___***",
    "ALLCAPS lowercase MiXeD CaSe",
]


def _texts():
    """The base texts plus variants with leading/trailing spaces and newlines: over 100 in all."""
    out = list(_TEXTS)
    for t in _TEXTS[:30]:
        out += [" " + t, t + " ", "\n" + t + "\n"]
    return out


def test_tokenizer_backend_equals_transformers(tokenizer, hf_tokenizer):
    assert json.loads(tokenizer.backend_tokenizer.to_str()) == json.loads(hf_tokenizer.backend_tokenizer.to_str())
    assert tokenizer.special_tokens_map == hf_tokenizer.special_tokens_map
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token)
    assert special == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tokenizer.padding_side == "left" and tokenizer.chat_template == hf_tokenizer.chat_template


def test_tokenizer_ids_match_transformers(tokenizer, hf_tokenizer):
    texts = _texts()
    assert len(texts) >= 100
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == hf_tokenizer(text)["input_ids"], repr(text)
        assert tokenizer.decode(ids) == text, repr(text)
    # SmolLM2 adds no BOS; special tokens in text stay whole.
    assert tokenizer("Paris")["input_ids"][0] != tokenizer.bos_token_id
    assert tokenizer("<|im_start|>user")["input_ids"][0] == 1


def test_tokenizer_save_load_roundtrip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in _texts():
        ids = tokenizer(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids, repr(text)
        assert loaded.decode(ids) == text, repr(text)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 2)
    short = loaded("Paris")["input_ids"]
    batch = loaded(["Paris", "Paris is in the country of"], padding=True)["input_ids"]
    assert loaded.padding_side == "left" and len(batch[0]) == len(batch[1]) > len(short)
    assert batch[0][-len(short) :] == short and set(batch[0][: -len(short)]) == {2}  # EOS pads on the left


def _write_gguf(path, arch, tensors=(), **meta):
    """A small GGUF file: `meta` keys are `GGUFWriter.add_<key>` calls, `tensors` (name, array) pairs."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in meta.items():
        getattr(writer, f"add_{key}")(value)
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_llama(path, extra_tensors=()):
    """A one-layer F32 llama GGUF (d 8, 2 heads of 4, 1 kv head, f 12, vocab 16) plus `extra_tensors`."""
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (16, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
        "blk.0.ffn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (4, 8),
        "blk.0.attn_v.weight": (4, 8), "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_gate.weight": (12, 8),
        "blk.0.ffn_up.weight": (12, 8), "blk.0.ffn_down.weight": (8, 12),
    }  # fmt: skip
    tensors = [(n, rng.standard_normal(s).astype(np.float32)) for n, s in shapes.items()]
    return _write_gguf(
        path, "llama", [*tensors, *extra_tensors], block_count=1, context_length=32, embedding_length=8,
        feed_forward_length=12, head_count=2, head_count_kv=1, layer_norm_rms_eps=1e-5, vocab_size=16,
    )  # fmt: skip


def test_tiny_llama_reads(tmp_path):
    names = dict(iter_gguf_tensors(open_gguf(_tiny_llama(tmp_path / "tiny.gguf"))))
    assert names["model.layers.0.self_attn.k_proj.weight"].shape == (4, 8)
    assert len(names) == 11 and "lm_head.weight" not in names


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("blk.0.attn_q.bias", "unknown GGUF tensors for llama: blk.0.attn_q.bias"),
        ("rope_freqs.weight", "unsupported RoPE scaling llama3"),
    ],
)
def test_unsupported_tensors(tmp_path, extra, message):
    reader = open_gguf(_tiny_llama(tmp_path / "tiny.gguf", [(extra, np.ones(2, np.float32))]))
    with pytest.raises(ConversionError, match=message):
        next(iter_gguf_tensors(reader))


def test_missing_file(tmp_path):
    with pytest.raises(ConversionError, match="GGUF file not found"):
        open_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ConversionError, match="not a GGUF file"):
        open_gguf(path)
    path.write_bytes(b"GGUF" + np.random.default_rng(1).bytes(4096))  # right magic, garbage after it
    with pytest.raises(ConversionError, match="corrupt or truncated GGUF"):
        open_gguf(path)


@pytest.mark.parametrize("fraction", [0.001, 0.5])
def test_truncated_gguf(smollm2_gguf, tmp_path, fraction):
    data = smollm2_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ConversionError, match="truncated"):
        open_gguf(path)


def test_non_llama_architecture(tmp_path):
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", [("token_embd.weight", np.zeros((4, 2), np.float32))])
    with pytest.raises(ConversionError, match=r"^unsupported GGUF architecture 'gpt2' \(only llama\)$"):
        open_gguf(path)
