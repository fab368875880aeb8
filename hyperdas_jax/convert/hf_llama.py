"""HF Llama (config.json + safetensors) -> NNX parameters, tensor by tensor, with a two-way coverage check."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Iterable, Iterator

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from hyperdas_jax.config import ConfigError, ModelConfig
from hyperdas_jax.convert.errors import ConversionError
from hyperdas_jax.models.llama import Llama
from hyperdas_jax.sharding import abstract_module

# HF tensors that carry no parameters of ours (recomputed buffers of old checkpoints).
IGNORED_HF_TENSORS = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_LAYER_LEAVES = {
    "self_attn.q_proj": (("self_attn", "q_proj", "kernel"), True),
    "self_attn.k_proj": (("self_attn", "k_proj", "kernel"), True),
    "self_attn.v_proj": (("self_attn", "v_proj", "kernel"), True),
    "self_attn.o_proj": (("self_attn", "o_proj", "kernel"), True),
    "mlp.gate_proj": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj": (("mlp", "down_proj", "kernel"), True),
    "input_layernorm": (("input_layernorm", "weight"), False),
    "post_attention_layernorm": (("post_attention_layernorm", "weight"), False),
}


def hf_name_to_path(name: str) -> tuple[tuple, bool] | None:
    """HF tensor name -> (NNX parameter path, transpose?), or None if the name is not ours."""
    if name == "model.embed_tokens.weight":
        return ("embed_tokens", "embedding"), False
    if name == "model.norm.weight":
        return ("norm", "weight"), False
    if name == "lm_head.weight":
        return ("lm_head", "kernel"), True
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_LEAVES:
        path, transpose = _LAYER_LEAVES[m.group(2)]
        return ("layers", int(m.group(1)), *path), transpose
    return None


def read_hf_config(folder: str | pathlib.Path, **overrides) -> tuple[ModelConfig, dict]:
    """Strictly parses `folder/config.json` into a ModelConfig; returns it and the raw dict."""
    path = pathlib.Path(folder) / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in {folder}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None
    try:
        return ModelConfig.from_hf(raw, **overrides), raw
    except ConfigError as e:
        raise ConversionError(f"{path}: {e}") from None


def safetensors_files(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """The weight files of an HF folder: a sharded index's files, or model.safetensors."""
    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{index}: malformed index ({e})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        files = [folder / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise ConversionError(f"missing weight file {f}")
    return files


def iter_safetensors(files: Iterable[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, numpy array) one tensor at a time; a truncated or corrupt file is a ConversionError."""
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{f}: unreadable safetensors file ({e})") from None


def load_params(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], *, mesh=None) -> Llama:
    """Builds a Llama from HF-named tensors, placing each one straight into its sharding.

    Every parameter must be filled exactly once and every tensor must map to a parameter or be on
    IGNORED_HF_TENSORS (a tied `lm_head.weight` equal to the embedding is also accepted).
    """
    graphdef, abstract = abstract_module(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh)
    slots = dict(nnx.to_flat_state(abstract))
    filled: dict[tuple, jax.Array] = {}
    tied_head = None
    for name, array in tensors:
        if any(p.fullmatch(name) for p in IGNORED_HF_TENSORS):
            continue
        mapped = hf_name_to_path(name)
        if mapped is not None and mapped[0] == ("lm_head", "kernel") and cfg.tie_word_embeddings:
            tied_head = array
            continue
        if mapped is None or mapped[0] not in slots:
            raise ConversionError(f"unexpected tensor {name!r} (no matching parameter for this config)")
        path, transpose = mapped
        if path in filled:
            raise ConversionError(f"tensor {name!r} appears twice")
        if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
            raise ConversionError(f"tensor {name!r} has non-float dtype {array.dtype}")
        array = array.T if transpose else array
        slot = slots[path]
        if tuple(array.shape) != tuple(slot.shape):
            raise ConversionError(f"tensor {name!r} has shape {tuple(array.shape)}, the config implies "
                                  f"{tuple(slot.shape)}")
        filled[path] = jax.device_put(np.asarray(array).astype(slot.dtype), slot.sharding)
    missing = [".".join(map(str, p)) for p in slots if p not in filled]
    if missing:
        raise ConversionError(f"{len(missing)} parameters have no tensor, e.g. {', '.join(missing[:4])}")
    if tied_head is not None:
        emb = np.asarray(jax.device_get(filled[("embed_tokens", "embedding")]), np.float32)
        if tied_head.shape != emb.shape or not np.allclose(np.asarray(tied_head, np.float32), emb):
            raise ConversionError("config ties embeddings but lm_head.weight differs from embed_tokens")
    state = nnx.from_flat_state([(p, v.replace(filled[p])) for p, v in slots.items()])
    return nnx.merge(graphdef, state)


def load_hf_folder(folder: str | pathlib.Path, *, mesh=None, **overrides) -> tuple[Llama, dict]:
    """Converts an HF Llama folder; returns the model and the raw HF config dict."""
    cfg, raw = read_hf_config(folder, **overrides)
    return load_params(cfg, iter_safetensors(safetensors_files(folder)), mesh=mesh), raw
