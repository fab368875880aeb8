"""Frozen dataclass configs, YAML loading with dotted overrides, and the strict HF config reader."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types
import typing
from typing import Any

import yaml

DTYPES = ("float32", "bfloat16", "float16")
COMPUTE_DTYPES = DTYPES + ("auto",)  # an experiment's compute dtypes; "auto": hyperdas_jax/compute_dtype.py


class ConfigError(ValueError):
    """A bad configuration: the message names the offending key or value."""


def require(ok: bool, message: str) -> None:
    """Raises ConfigError(message) unless `ok`: the one-line check every config section uses."""
    if not ok:
        raise ConfigError(message)


def _at_least(section, names: str, low: float, strict: bool = False) -> None:
    """Each named field of `section` (a dataclass whose `_where` is its dotted prefix) is >= low (> low)."""
    for name in names.split():
        value = getattr(section, name)
        if value is not None:
            require(value > low if strict else value >= low,
                    f"{section._where}.{name} must be {'>' if strict else '>='} {low:g}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Model


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style RoPE frequency scaling (HF `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama decoder. Field names follow HF `LlamaConfig`.

    `param_dtype` is the storage dtype of the weights, `dtype` the compute dtype of
    activations. RMSNorm statistics, RoPE tables, attention softmax and logits are always
    float32, as in HF.
    """

    vocab_size: int = 97
    hidden_size: int = 64
    intermediate_size: int = 96
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"model.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        """Reads an HF Llama `config.json` dict, refusing anything that would change the maths.

        Args:
          hf: the parsed `config.json`.
          **overrides: fields not taken from HF (`param_dtype`, `dtype`).
        Returns:
          The model config.
        Raises:
          ConfigError: an unsupported key or value, named in the message.
        """
        return cls(**_from_hf_fields(hf), **overrides)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict (transformers 5 `rope_parameters` form)."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }


# HF keys read into ModelConfig, and keys that do not change the forward maths.
_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)
_HF_IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "attention_dropout", "_name_or_path", "output_hidden_states",
    "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "_attn_implementation", "attn_implementation",
    "tokenizer_class", "quantization_config_ignored", "pruned_heads", "tf_legacy_loss",
    "use_bfloat16", "torchscript", "task_specific_params", "finetuning_task", "prefix",
    "sep_token_id", "decoder_start_token_id", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "is_decoder", "bad_words_ids", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "transformers.js_config", "layer_types",
})
# Keys that must hold these values: anything else changes the maths.
_HF_REQUIRED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings", "partial_rotary_factor"}


def _from_hf_fields(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"unsupported model_type {hf.get('model_type')!r} (only 'llama')")
    for key, want in _HF_REQUIRED.items():
        if key in hf and hf[key] != want:
            raise ConfigError(f"unsupported {key}={hf[key]!r} (only {want!r} is implemented)")
    rope_keys = {"rope_parameters", "rope_theta", "rope_scaling"}
    unknown = sorted(set(hf) - set(_HF_FIELDS) - _HF_IGNORED - set(_HF_REQUIRED) - rope_keys)
    if unknown:
        raise ConfigError(f"unsupported HF config keys: {', '.join(unknown)}")
    missing = [k for k in _HF_FIELDS[:6] if k not in hf]
    if missing:
        raise ConfigError(f"HF config lacks required keys: {', '.join(missing)}")
    fields = {k: hf[k] for k in _HF_FIELDS if hf.get(k) is not None}
    for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if isinstance(fields.get(k), list):  # Llama-3.1 lists several EOS ids; the first is the pad/stop id
            fields[k] = fields[k][0]
    fields.update(_rope_from_hf(hf))
    return fields


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    rope = hf.get("rope_parameters")
    if rope is None:  # transformers < 5: rope_theta at top level, optional rope_scaling dict
        rope = dict(hf.get("rope_scaling") or {})
        rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    unknown = sorted(set(rope) - _ROPE_KEYS)
    if unknown:
        raise ConfigError(f"unsupported rope parameters: {', '.join(unknown)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"unsupported partial_rotary_factor={rope['partial_rotary_factor']!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", 10000.0))}
    if kind == "default":
        out["rope_scaling"] = None
    elif kind == "llama3":
        try:
            out["rope_scaling"] = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ConfigError(f"llama3 rope scaling lacks {e.args[0]!r}") from None
    else:
        raise ConfigError(f"unsupported rope_type {kind!r} (supported: default, llama3)")
    return out


# --------------------------------------------------------------------------------------------
# Generic YAML <-> dataclass plumbing


def from_dict(cls, data: dict[str, Any] | None, where: str = ""):
    """Builds dataclass `cls` from a nested dict; unknown keys are errors."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join((where + '.' if where else '') + k for k in unknown)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _coerce(tp, value, where):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (elem, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(elem, v, where) for v in value)
    if tp is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp in (int, str, bool) and not isinstance(value, tp) or tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg) -> dict[str, Any]:
    """The nested plain-dict form of a config (JSON/YAML safe)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Applies `a.b=c` overrides (values parsed as YAML scalars) to a nested dict."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def load_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


# --------------------------------------------------------------------------------------------
# Experiment


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """The frozen target: a converted checkpoint directory, or a random model (tests, benchmarks)."""

    path: str | None = None
    random: ModelConfig | None = None
    dtype: str = "float32"  # compute dtype; "auto": chosen for the machine at start-up (hyperdas_jax/compute_dtype.py)
    param_dtype: str | None = None  # storage dtype override (bfloat16 halves a large target's memory)
    remat: bool = False  # recompute the target's blocks [L, n) and the hypernetwork's blocks in the backward pass

    def __post_init__(self):
        if (self.path is None) == (self.random is None):
            raise ConfigError("target: give exactly one of target.path (converted checkpoint) or target.random")
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"target.dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        if self.param_dtype not in DTYPES + (None,):
            raise ConfigError(f"target.param_dtype must be one of {DTYPES} or null, got {self.param_dtype!r}")


@dataclasses.dataclass(frozen=True)
class HypernetConfig:
    """The HyperDAS editor (§3): N truncated target blocks with source and base cross-attention."""

    _where = "hypernet"

    num_layers: int = 2
    init: str = "target"  # "target": copy the target's first N blocks; "scratch": PyTorch default init
    self_attention: str = "causal"  # "causal", or "original" (bidirectional when no editor row is padded)
    source_cross_attention: bool = True
    base_cross_attention: bool = True
    break_asymmetric: bool = False  # random [s;b] vs [b;s] order in the selection head's pair features
    dropout: float = 0.0  # in training, each editor sub-block's output (the residual branch) is dropped with this
    # probability and the rest scaled by 1/(1-p); evaluation never drops. 0 = off, as the original (its Llama
    # config's attention_dropout is 0.0)
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        if self.init not in ("target", "scratch"):
            raise ConfigError(f"hypernet.init must be 'target' or 'scratch', got {self.init!r}")
        if self.self_attention not in ("causal", "original"):
            raise ConfigError(f"hypernet.self_attention must be 'causal' or 'original', got {self.self_attention!r}")
        _at_least(self, "num_layers", 1)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"hypernet.dropout must be in [0, 1), got {self.dropout!r}")
        if self.param_dtype not in DTYPES:
            raise ConfigError(f"hypernet.param_dtype must be one of {DTYPES}, got {self.param_dtype!r}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"hypernet.dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")


SUBSPACES = ("reflect", "das", "mask", "boundless", "none")
MODES = ("soft", "column_argmax", "bidding_argmax", "global_argmax", "groundtruth")


@dataclasses.dataclass(frozen=True)
class InterventionConfig:
    """Where and how the target is patched (§5, §6)."""

    _where = "intervention"

    layer: int = 15  # patches hs[layer], the residual stream entering block `layer`
    subspace: str = "reflect"
    rank: int = 128
    # Beyond the paper: ReflectSelect's number of instruction-dependent Householder reflections,
    # W = H_m···H_1 R (1 = the original, where any two concepts' subspaces share at least rank − 2 dimensions).
    reflections: int = 1
    mlp_hidden: int | None = None  # ReflectSelect/MaskSelect MLP width; None: the target's intermediate size
    temperature_start: float = 50.0
    temperature_end: float = 0.1
    bidding_threshold: float = 0.1
    # Beyond the paper: adds prior·cos(s_i, b_j) to every (source i, base j) selection logit, the cosine
    # of the target's own hs[layer] states after subtracting each prompt's mean (BOS left out). Built
    # from what the method already sees, never from entity positions; 0 = off (the original).
    similarity_prior: float = 0.0
    # Beyond the paper: adds anchor_prior·(cos(s_i, e_s) + cos(b_j, e_b)) to every pair logit, e_b and e_s the
    # target's hs[layer] states of the base and source entity's names inside the instruction
    # ("Vienna ; Paris - Country"), every state centred on its sequence's mean. Built from the instruction,
    # which the method reads at inference, never from entity positions; 0 = off (the original).
    anchor_prior: float = 0.0
    # The layer whose states the anchor prior compares (instruction names and prompt tokens alike);
    # None: intervention.layer. Only where the prior looks, not where the intervention patches.
    anchor_layer: int | None = None
    # RoPE positions of the selection head's SELF row: "real" counts only real base tokens, so A does
    # not depend on how a batch is padded; "original" counts every SELF entry, pads included, as the
    # original implementation does (identical on a batch without padding).
    self_positions: str = "real"
    # Beyond the paper: "rope" (the original) rotates the selection head's query by its editor position
    # and each pair's key by the pair's row-major index in the flattened (source, base) grid; "none"
    # scores every pair by content alone, so a pair's logit does not move with where the entity sits in
    # the prompt template.
    pair_positions: str = "rope"

    def __post_init__(self):
        require(self.self_positions in ("real", "original"),
                f"intervention.self_positions must be 'real' or 'original', got {self.self_positions!r}")
        require(self.pair_positions in ("rope", "none"),
                f"intervention.pair_positions must be 'rope' or 'none', got {self.pair_positions!r}")
        if self.subspace not in SUBSPACES:
            raise ConfigError(f"intervention.subspace must be one of {SUBSPACES}, got {self.subspace!r}")
        _at_least(self, "layer rank", 0)
        require(self.anchor_layer is None or self.anchor_layer >= 0,
                f"intervention.anchor_layer must be >= 0 or null, got {self.anchor_layer!r}")
        _at_least(self, "rank mlp_hidden reflections", 1)
        require(self.reflections == 1 or self.subspace == "reflect",
                f"intervention.reflections={self.reflections} needs intervention.subspace=reflect, "
                f"got {self.subspace!r}")
        _at_least(self, "temperature_start temperature_end", 0, strict=True)
        require(0 <= self.bidding_threshold <= 1,
                f"intervention.bidding_threshold must be in [0, 1], got {self.bidding_threshold!r}")

    @property
    def anchor_states_layer(self) -> int:
        """The layer whose states the anchor prior compares."""
        return self.layer if self.anchor_layer is None else self.anchor_layer


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """Source-selection sparsity penalty and its weight schedule (§4.3)."""

    _where = "train.sparsity"

    enabled: bool = True
    schedule: str = "linear"  # "linear" (HEAD), "ramp" (no jump after the warm-up) or "constant" (the paper's)
    start: float = 0.15
    end: float = 1.5
    warmup_ratio: float = 0.5
    form: str = "mass"  # "mass" (the original's Σ S_i over full rows) or "log" (its gradient does not saturate)

    def __post_init__(self):
        if self.schedule not in ("linear", "ramp", "constant"):
            raise ConfigError(f"train.sparsity.schedule must be 'linear', 'ramp' or 'constant', got {self.schedule!r}")
        if self.form not in ("mass", "log"):
            raise ConfigError(f"train.sparsity.form must be 'mass' or 'log', got {self.form!r}")
        _at_least(self, "start end", 0)
        require(0 <= self.warmup_ratio < 1, f"train.sparsity.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")


HARD_TRAIN_MODES = ("column_argmax", "bidding_argmax", "global_argmax")


@dataclasses.dataclass(frozen=True)
class StraightThroughConfig:
    """Beyond the paper: training through an inference mode's hard selection (straight-through).

    From step int(start_ratio·steps) on, the first round(share·b) rows of every batch are patched with
    `mode`'s one-hot selection, the matrix that mode uses at inference, while the gradient reaches the
    soft A as if A itself had been used (A + stop_gradient(hard − A)); the other rows train on A.
    `mode` None: off (the original trains on A only). `head_lr_scale`: the selection head's learning rate
    is multiplied by it from the same step on (1: unchanged).
    """

    _where = "train.straight_through"

    mode: str | None = None
    start_ratio: float = 0.5
    share: float = 0.5
    head_lr_scale: float = 1.0

    def __post_init__(self):
        require(self.mode is None or self.mode in HARD_TRAIN_MODES,
                f"train.straight_through.mode must be null or one of {HARD_TRAIN_MODES}, got {self.mode!r}")
        require(0 <= self.start_ratio < 1, f"train.straight_through.start_ratio must be in [0, 1), "
                f"got {self.start_ratio!r}")
        require(0 < self.share <= 1, f"train.straight_through.share must be in (0, 1], got {self.share!r}")
        require(0 <= self.head_lr_scale, f"train.straight_through.head_lr_scale must be >= 0, "
                f"got {self.head_lr_scale!r}")

    def start_step(self, steps: int) -> int:
        """The phase's first step in a run of `steps` steps: int(start_ratio·steps), Python's truncation."""
        return int(self.start_ratio * steps)


@dataclasses.dataclass(frozen=True)
class WeightAverageConfig:
    """Beyond the paper: evaluate a running mean of the weights along training (weight averaging).

    At every step s >= int(start_ratio·steps) with s % every == 0 the parameters, as they are after
    that step's update, join a running mean; from the first such step on, evaluations (periodic
    validation, tools.eval_ravel on the run's checkpoints) use the mean, and checkpoints keep it
    beside the parameters. Training itself is unchanged. `start_ratio` None: off.
    """

    _where = "train.weight_average"

    start_ratio: float | None = None
    every: int = 50

    def __post_init__(self):
        require(self.start_ratio is None or 0 <= self.start_ratio < 1,
                f"train.weight_average.start_ratio must be null or in [0, 1), got {self.start_ratio!r}")
        _at_least(self, "every", 1)

    def samples(self, step: int, steps: int) -> bool:
        """Whether the parameters after step `step` (1-based) join the mean."""
        return (self.start_ratio is not None and step >= int(self.start_ratio * steps)
                and step % self.every == 0)

    def sampled_steps(self, steps: int, upto: int | None = None) -> list[int]:
        """The steps whose weights are in the mean after step `upto` (default: the whole run)."""
        last = steps if upto is None else min(upto, steps)
        return [s for s in range(self.every, last + 1, self.every) if self.samples(s, steps)]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation (§7)."""

    _where = "train"

    steps: int = 1000
    batch_size: int = 16
    lr: float = 4e-5
    weight_decay: float = 0.01
    rotate_lr: float = 1e-3  # R (any parameter under a `rotate_layer`), no weight decay
    head_lr: float | None = None  # the selection head (`head`); None: `lr`, as in the original
    mask_lr: float = 1e-2  # MaskSelect / BoundlessDAS `mask_projection`
    # ReflectSelect's reflection-vector MLP (`rv_norm`, `rv_proj`); None: `lr`, as in the original
    reflect_lr: float | None = None
    clip_norm: float = 4.0
    # Every learning rate falls linearly to 0 over the last lr_decay_ratio of the steps (0: constant, as the original).
    lr_decay_ratio: float = 0.0
    causal_loss_weight: float = 3.5
    iso_loss_weight: float = 0.5
    sparsity: SparsityConfig = SparsityConfig()
    straight_through: StraightThroughConfig = StraightThroughConfig()
    weight_average: WeightAverageConfig = WeightAverageConfig()
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    # Frozen-target clean states computed once per prompt and reused (hyperdas_jax/clean_states.py):
    # "auto" caches when one process runs and the estimate fits in state_cache_gb of host RAM.
    state_cache: str = "auto"
    state_cache_gb: float = 8.0

    def __post_init__(self):
        if self.state_cache not in ("auto", "always", "never"):
            raise ConfigError(f"train.state_cache must be 'auto', 'always' or 'never', got {self.state_cache!r}")
        _at_least(self, "steps batch_size keep_checkpoints", 1)
        _at_least(self, "lr head_lr reflect_lr", 0, strict=True)
        require(0 <= self.lr_decay_ratio <= 1, f"train.lr_decay_ratio must be in [0, 1], got {self.lr_decay_ratio!r}")
        _at_least(self, "weight_decay rotate_lr mask_lr clip_norm causal_loss_weight iso_loss_weight log_every "
                  "eval_every checkpoint_every state_cache_gb", 0)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    _where = "eval"

    modes: tuple[str, ...] = ("soft", "bidding_argmax")
    n_answer_tokens: int | None = 3  # exact match over the first k answer tokens; None: all of them
    batch_size: int = 16
    heatmaps: int = 4

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ConfigError(f"eval.modes: unknown mode(s) {bad}; choose from {MODES}")
        require(len(self.modes) > 0, "eval.modes is empty; give at least one mode")
        _at_least(self, "n_answer_tokens batch_size", 1)
        _at_least(self, "heatmaps", 0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: str | None = None  # arrow folder written by tools/prepare_ravel.py
    test: str | None = None
    validation: str | None = None
    base_suffix_visible: bool = False
    source_suffix_visible: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    shape: tuple[int, ...] = (1, 1, 1)  # (data, fsdp, tensor); one entry may be -1
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)

    def __post_init__(self):
        if len(self.shape) != 3 or list(self.shape).count(-1) > 1:
            raise ConfigError(f"mesh.shape must be (data, fsdp, tensor) with at most one -1, got {self.shape}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    target: TargetConfig = TargetConfig(random=ModelConfig())
    hypernet: HypernetConfig = HypernetConfig()
    intervention: InterventionConfig = InterventionConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    name: str = "experiment"


def check_fits_target(cfg: ExperimentConfig, target: ModelConfig) -> None:
    """The settings that depend on the target's shape: a one-line ConfigError when they cannot work."""
    iv = cfg.intervention
    require(iv.layer < target.num_hidden_layers,
            f"intervention.layer={iv.layer} must be below the target's {target.num_hidden_layers} layers")
    require(iv.layer > 0 or iv.subspace == "none",  # as in the original: at the embeddings only a full patch
            "intervention.layer=0 requires intervention.subspace=none")
    require(iv.anchor_layer is None or iv.anchor_layer < target.num_hidden_layers,
            f"intervention.anchor_layer={iv.anchor_layer} must be below the target's {target.num_hidden_layers} layers")
    require(iv.rank <= target.hidden_size,
            f"intervention.rank={iv.rank} exceeds the target's hidden size {target.hidden_size}")
    require(cfg.hypernet.num_layers <= target.num_hidden_layers,
            f"hypernet.num_layers={cfg.hypernet.num_layers} exceeds the target's {target.num_hidden_layers} layers")


def load_config(path: str | pathlib.Path | None = None, overrides=()) -> ExperimentConfig:
    """ExperimentConfig from a YAML file (or defaults) with `a.b=c` overrides; unknown keys are errors."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(ExperimentConfig, apply_overrides(data, list(overrides)))
