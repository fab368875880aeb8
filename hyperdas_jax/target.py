"""A converted target model on disk (Orbax params + config + HF tokenizer) and the scripting entry point."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from hyperdas_jax.atomic import atomic_directory
from hyperdas_jax.compute_dtype import resolve as resolve_dtype
from hyperdas_jax.config import ConfigError, ModelConfig, from_dict, to_dict
from hyperdas_jax.models.llama import Llama
from hyperdas_jax.sharding import abstract_module, create_sharded

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
INFO_FILE = "conversion.json"


class TargetError(ValueError):
    """A missing, incomplete or mismatched target checkpoint."""


def save_target(out: str | pathlib.Path, model: Llama, tokenizer=None, *, info: dict | None = None,
                overwrite: bool = False) -> pathlib.Path:
    """Writes `out/` atomically: everything goes to a sibling temp dir that is renamed at the end.

    Layout: `model_config.json` (ModelConfig), `params/` (Orbax), the tokenizer's HF files
    (loadable with `AutoTokenizer.from_pretrained(out)`), and `conversion.json` (provenance).
    """
    out = pathlib.Path(out).absolute()
    check_replaceable(out, overwrite)
    check_finite(model)
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config)
    with atomic_directory(out) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(to_dict(model.config), indent=2) + "\n")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS_DIR, nnx.state(model, nnx.Param))
        checkpointer.wait_until_finished()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / INFO_FILE).write_text(json.dumps(info or {}, indent=2) + "\n")
    return out


def is_target_dir(path: pathlib.Path) -> bool:
    """Whether `path` is a folder the converter wrote (its config and provenance files are there)."""
    return path.is_dir() and not path.is_symlink() and (path / CONFIG_FILE).is_file() and (path / INFO_FILE).is_file()


def check_replaceable(out: pathlib.Path, overwrite: bool) -> None:
    """TargetError unless a target may be written to `out`: it is free, or `overwrite` is set and it
    holds a target the converter wrote (never a folder or file it did not write)."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise TargetError(f"{out} already exists (pass --overwrite to replace it)")
        if not is_target_dir(out):
            raise TargetError(f"{out} is not a converted target ({CONFIG_FILE} and {INFO_FILE} missing): "
                              "--overwrite only replaces what the converter wrote; choose another --out")


def check_finite(model: Llama) -> None:
    """TargetError naming the first parameter that holds a NaN or an infinity."""
    for key, value in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        if not bool(jnp.all(jnp.isfinite(value))):
            bad = int(np.size(value) - np.isfinite(np.asarray(value, np.float32)).sum())
            raise TargetError(f"parameter {jax.tree_util.keystr(key, simple=True, separator='.')} holds {bad} "
                              "non-finite value(s) (NaN or infinity): the source weights are damaged")


def check_tokenizer(tokenizer, cfg: ModelConfig) -> None:
    """TargetError when a tokenizer cannot belong to the model: ids beyond the embedding, or another
    BOS id than the model's config (EOS is not compared: instruct models stop on several ids)."""
    size = len(tokenizer)
    if size > cfg.vocab_size:
        raise TargetError(f"the tokenizer has {size} tokens but the model's embedding only {cfg.vocab_size}: "
                          "it belongs to another model")
    model_bos, tok_bos = cfg.bos_token_id, getattr(tokenizer, "bos_token_id", None)
    if model_bos is not None and tok_bos is not None and model_bos != tok_bos:
        raise TargetError(f"the tokenizer's BOS id is {tok_bos} but the model's is {model_bos}: "
                          "it belongs to another model")


def load_tokenizer(name: str | os.PathLike):
    """An HF tokenizer from a folder (or a Hub id), with a one-line TargetError when there is none."""
    path = pathlib.Path(name)
    text = str(name)
    if path.exists() and not path.is_dir():
        raise TargetError(f"tokenizer {text!r} is a file; give the folder that holds tokenizer.json")
    if not path.exists() and (text.startswith((".", "/", "~")) or text.count("/") > 1):  # not a Hub id
        raise TargetError(f"tokenizer folder {text!r} does not exist")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(text)
    except (OSError, ValueError, TypeError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise TargetError(f"cannot load a tokenizer from {text!r}: {first}") from None


def check_target_path(cfg) -> None:
    """ConfigError when an ExperimentConfig's target.path is not a converted target (checked before
    any device or checkpoint work)."""
    if cfg.target.path is not None:
        try:
            read_model_config(cfg.target.path)
        except TargetError as e:
            raise ConfigError(f"target.path: {e}") from None


def read_model_config(path: str | pathlib.Path, **overrides) -> ModelConfig:
    """The ModelConfig stored in a converted target directory (fields may be overridden, e.g. dtype)."""
    file = pathlib.Path(path) / CONFIG_FILE
    if not file.is_file():
        raise TargetError(f"{path} is not a converted target: {CONFIG_FILE} missing "
                          "(convert one with tools/convert_hf_llama.py)")
    try:
        data = json.loads(file.read_text())
        data.update(overrides)
        return from_dict(ModelConfig, data, "model")
    except (json.JSONDecodeError, ConfigError) as e:
        raise TargetError(f"{file}: {e}") from None


def restore_model(path: str | pathlib.Path, *, mesh=None, **overrides) -> Llama:
    """Restores the Orbax parameters straight into (possibly sharded) arrays.

    `overrides` may change `dtype` or `param_dtype`; parameters are restored in their stored
    dtype and cast afterwards.
    """
    stored_cfg = read_model_config(path)
    cfg = read_model_config(path, **overrides)
    params = pathlib.Path(path).absolute() / PARAMS_DIR
    if not params.is_dir():
        raise TargetError(f"{path}: parameter directory {PARAMS_DIR}/ missing")
    _, abstract = abstract_module(lambda: Llama(stored_cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, _ = abstract_module(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh)
    try:
        state = ocp.StandardCheckpointer().restore(params, abstract)
    except Exception as e:  # orbax raises many exception types; the message is what matters
        raise TargetError(f"{params}: cannot restore parameters ({type(e).__name__}: {str(e)[:300]})") from None
    dtype = jnp.dtype(cfg.param_dtype)
    state = jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else x, state)
    return nnx.merge(graphdef, state)


def target_model_config(cfg):
    """The random target's ModelConfig with the run's dtype overrides applied (an ExperimentConfig's)."""
    t = cfg.target
    return dataclasses.replace(t.random, dtype=resolve_dtype(t.dtype),
                               param_dtype=t.param_dtype or t.random.param_dtype)


def target_overrides(cfg) -> dict:
    """The ModelConfig fields an ExperimentConfig's `target` overrides in a converted target's config."""
    t = cfg.target
    return {"dtype": resolve_dtype(t.dtype), **({"param_dtype": t.param_dtype} if t.param_dtype else {})}


def build_target(cfg, mesh) -> Llama:
    """The frozen target of an ExperimentConfig on `mesh`: restored from a converted directory, or
    random (seeded by train.seed)."""
    t = cfg.target
    if t.path is not None:
        return restore_model(t.path, mesh=mesh, **target_overrides(cfg))
    mcfg = target_model_config(cfg)
    return create_sharded(lambda: Llama(mcfg, rngs=nnx.Rngs(cfg.train.seed)), mesh)


class Target:
    """A frozen target model ready to script against: `.config`, `.tokenizer`, `.model`, `__call__`."""

    def __init__(self, model: Llama, tokenizer=None, path: str | None = None):
        self.model = model
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.path = path
        graphdef, state = nnx.split(model)
        self._graphdef, self._state = graphdef, state

        def logits_fn(state, ids, mask, pos):
            return nnx.merge(graphdef, state)(ids, mask, pos)

        self._logits = jax.jit(logits_fn)

    def __call__(self, input_ids, attention_mask=None, position_ids=None) -> jax.Array:
        """Logits (b, t, v) float32 for ids (b, t); numpy or jax inputs. Default positions ignore left pads."""
        ids = jnp.asarray(input_ids, jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, time), got shape {ids.shape}")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{ids.shape[1]} positions exceed the model's context of "
                             f"{self.config.max_position_embeddings} (max_position_embeddings)")
        mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if position_ids is None:
            position_ids = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        pos = jnp.asarray(position_ids, jnp.int32)
        return self._logits(self._state, ids, mask, pos)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and mask (b, t) for a list of strings, using the tokenizer's own BOS rule."""
        if self.tokenizer is None:
            raise ValueError("this target has no tokenizer")
        enc = self.tokenizer(list(texts), padding=True, return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def greedy(self, texts: list[str], max_new_tokens: int = 8) -> list[str]:
        """Greedy completions. The buffer has a fixed width, so one program is compiled for all steps."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids, mask = self.encode(texts)
        empty = [i for i, row in enumerate(mask) if not row.any()]
        if empty:
            raise ValueError(f"prompt {empty[0] + 1} is empty: there is nothing to complete")
        b, t = ids.shape
        if t + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"the longest prompt ({int(mask.sum(1).max())} tokens) plus {max_new_tokens} new "
                             f"tokens exceeds the model's context of {self.config.max_position_embeddings}")
        ids = np.concatenate([ids, np.zeros((b, max_new_tokens), np.int32)], axis=1)
        mask = np.concatenate([mask, np.zeros((b, max_new_tokens), np.int32)], axis=1)
        for step in range(max_new_tokens):
            # Empty slots on the right are masked and, by causality, never seen by earlier positions.
            logits = self(ids, mask)
            ids[:, t + step] = np.asarray(jnp.argmax(logits[:, t + step - 1], axis=-1))
            mask[:, t + step] = 1
        return [self.tokenizer.decode(row, skip_special_tokens=False) for row in ids[:, t:]]


def load_target(path: str | pathlib.Path, *, mesh=None, **overrides) -> Target:
    """Loads a converted target directory. `overrides` change config fields such as `dtype="bfloat16"`."""
    path = pathlib.Path(path)
    model = restore_model(path, mesh=mesh, **overrides)
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return Target(model, tokenizer, str(path))
