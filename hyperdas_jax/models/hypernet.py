"""The HyperDAS editor: N Llama blocks with source and base cross-attention over the target's hidden states (§3).

Each block (pre-RMSNorm, residual after each sub-block):
  x += self_attn(input_layernorm(x))                               causal, RoPE at editor positions
  x += source_cross_attn(source_cross_attn_layernorm(x); memory)   keys/values: source hidden states
  x += base_cross_attn(base_cross_attn_layernorm(x); memory)       keys/values: base hidden states
  x += mlp(post_attention_layernorm(x))
then a final RMSNorm. The memory of each side is every hidden state hs[0..n] of every token,
unit-L2 normalised, flattened token-major (index t*(n+1) + l), visible only where the token is in
the intervention mask. Key positions are cumsum(mask)*mask over that flat axis (1, 2, ... for
visible entries); editor positions are cumsum(editor_mask) (first real token is 1). §3.3.
When the batch names the visible tokens (collate's `*_memory_index`), the memory holds only those:
the same attention with fewer keys (`make_memory`). With `hypernet.dropout` = p > 0 a training step
drops each sub-block's output (before it is added) elementwise with probability p and scales the rest
by 1/(1-p); evaluation never drops (not in the original, whose attention_dropout is 0).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hyperdas_jax.config import HypernetConfig, ModelConfig
from hyperdas_jax.models.layers import (MLP, Attention, AttnInputs, Embed, RMSNorm, remat_module, rope_inv_freq,
                                       rope_tables)
from hyperdas_jax.sharding import constrain


class Memory(NamedTuple):
    """One cross-attention stream: flattened unit-norm target states and their visibility/RoPE."""

    states: jax.Array  # (b, s, d) with s = T * (n+1)
    mask: jax.Array  # (b, s) bool
    cos: jax.Array  # (b, s, h)
    sin: jax.Array  # (b, s, h)


def editor_config(target: ModelConfig, hyper: HypernetConfig) -> ModelConfig:
    """The target's architecture with the hypernetwork's dtypes (`auto` resolved for this machine)."""
    import dataclasses

    from hyperdas_jax.compute_dtype import resolve

    return dataclasses.replace(target, param_dtype=hyper.param_dtype, dtype=resolve(hyper.dtype))


def unit_normalise(x: jax.Array) -> jax.Array:
    """Unit Euclidean norm over the last axis (not RMS); zero vectors stay zero."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    return (x32 / jnp.maximum(norm, 1e-12)).astype(x.dtype)


def visible_states(hidden: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The states of the tokens `index` (b, w) names (-1: none), in its order: ((n+1, b, w, d), (b, w) mask)."""
    rows = jnp.arange(hidden.shape[1])[:, None]  # (b, 1)
    return hidden[:, rows, jnp.maximum(index, 0)], index >= 0


def make_memory(hidden: jax.Array, intervention_mask: jax.Array, cfg: ModelConfig,
                index: jax.Array | None = None) -> Memory:
    """Builds a cross-attention memory from stacked target states.

    Args:
      hidden: (n+1, b, t, d) hidden states in HF's convention (Llama.hidden_states).
      intervention_mask: (b, t) 1 where the token is visible to the hypernetwork.
      cfg: the editor config (head dim, RoPE base).
      index: optional (b, w) positions of the visible tokens in order, then -1 (collate's
        `*_memory_index`, w <= t): the memory holds only those tokens. Attention is the same as
        over the full memory (invisible entries weigh exactly 0, and key positions count visible
        entries only, so each keeps its position) up to float summation order, at w/t of the cost.
        Every row must show at least one token (a row showing none attends uniformly to whatever
        the memory holds).
    Returns:
      Memory with states (b, t*(n+1), d), token-major (w*(n+1) with `index`).
    """
    if index is not None:
        hidden, intervention_mask = visible_states(hidden, index)
    layers, b, t, d = hidden.shape
    states = unit_normalise(jnp.transpose(hidden, (1, 2, 0, 3)).reshape(b, t * layers, d))  # (b, s, d)
    mask = jnp.repeat(intervention_mask > 0, layers, axis=1)  # (b, s)
    pos = jnp.cumsum(mask, axis=1) * mask  # (b, s): 1, 2, ... over visible entries, 0 elsewhere
    cos, sin = rope_tables(pos, rope_inv_freq(cfg))
    return Memory(states, mask, cos, sin)


def residual_dropout(y: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """y with each element zeroed with probability `rate` and the rest scaled by 1/(1-rate) (inverted dropout)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, y.shape)
    return jnp.where(keep, y / jnp.asarray(1.0 - rate, y.dtype), jnp.zeros((), y.dtype))


class HyperBlock(nnx.Module):
    """Llama block + source and base cross-attention sub-blocks, each with its own pre-norm."""

    def __init__(self, cfg: ModelConfig, hyper: HypernetConfig, *, rngs: nnx.Rngs):
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps, param_dtype=pd)
        self.self_attn = Attention(cfg, rngs=rngs)
        if hyper.source_cross_attention:
            self.source_cross_attn_layernorm = RMSNorm(d, eps, param_dtype=pd)
            self.source_cross_attn = Attention(cfg, rngs=rngs)
        if hyper.base_cross_attention:
            self.base_cross_attn_layernorm = RMSNorm(d, eps, param_dtype=pd)
            self.base_cross_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, eps, param_dtype=pd)
        self.mlp = MLP(d, cfg.intermediate_size, param_dtype=pd, dtype=dt, rngs=rngs)
        self.use_source, self.use_base = hyper.source_cross_attention, hyper.base_cross_attention

    def __call__(self, x: jax.Array, attn: AttnInputs, query_valid: jax.Array, source: Memory, base: Memory,
                 dropout_key: jax.Array | None = None, dropout: float = 0.0):
        # `dropout` may be traced (under remat): the key alone decides whether anything is dropped.
        keys = None if dropout_key is None else iter(jax.random.split(dropout_key, 4))
        drop = lambda y: y if keys is None else residual_dropout(y, dropout, next(keys))  # noqa: E731
        x = x + drop(self.self_attn(self.input_layernorm(x), attn))
        if self.use_source:
            x = x + drop(self._cross(self.source_cross_attn, self.source_cross_attn_layernorm, x, attn, query_valid,
                                     source))
        if self.use_base:
            x = x + drop(self._cross(self.base_cross_attn, self.base_cross_attn_layernorm, x, attn, query_valid, base))
        x = x + drop(self.mlp(self.post_attention_layernorm(x)))
        return constrain(x, ("batch", "seq", None))

    @staticmethod
    def _cross(module: Attention, norm: RMSNorm, x, attn: AttnInputs, query_valid, memory: Memory):
        # No causal mask; padded editor rows see nothing (the finite mask value keeps them NaN-free).
        mask = query_valid[:, :, None] & memory.mask[:, None, :]  # (b, t, s)
        cross = AttnInputs(mask, attn.cos, attn.sin)
        return module(norm(x), cross, kv=memory.states.astype(x.dtype), kv_rope=(memory.cos, memory.sin))


class HyperNetwork(nnx.Module):
    """Editor trunk: its own (trainable) token embedding, N HyperBlocks, final RMSNorm."""

    def __init__(self, target_cfg: ModelConfig, hyper: HypernetConfig, *, rngs: nnx.Rngs):
        cfg = editor_config(target_cfg, hyper)
        if hyper.num_layers > cfg.num_hidden_layers:
            raise ValueError(f"hypernet.num_layers={hyper.num_layers} exceeds the target's {cfg.num_hidden_layers}")
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.config, self.hyper = cfg, hyper
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=pd, dtype=dt, rngs=rngs)
        self.layers = nnx.List([HyperBlock(cfg, hyper, rngs=rngs) for _ in range(hyper.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)

    def self_attention_inputs(self, editor_mask: jax.Array) -> tuple[AttnInputs, jax.Array]:
        """Editor mask/RoPE and its positions cumsum(mask) (first real token 1, pads 0)."""
        editor_mask = editor_mask > 0
        t = editor_mask.shape[1]
        pos = jnp.cumsum(editor_mask, axis=1) * editor_mask  # (b, t)
        allowed = jnp.tril(jnp.ones((t, t), bool))[None] & editor_mask[:, None, :]  # (b, t, s)
        if self.hyper.self_attention == "original":
            # The original's SDPA-mask shortcut: when no instruction in the batch is shorter than the
            # longest, no mask is built at all and the eager blocks attend bidirectionally (§3.2).
            lengths = jnp.sum(editor_mask, axis=1)
            padded = jnp.any(lengths < jnp.max(lengths))
            allowed = jnp.where(padded, allowed, jnp.ones_like(allowed))
        cos, sin = rope_tables(pos, rope_inv_freq(self.config))
        return AttnInputs(allowed, cos, sin), pos

    def __call__(self, editor_ids: jax.Array, editor_mask: jax.Array, source: Memory, base: Memory, *,
                 remat: bool = False, dropout: float = 0.0, dropout_key: jax.Array | None = None):
        """Returns final-normed editor states Z (b, t_e, d) and the editor positions (b, t_e).

        With `remat` each block is recomputed in the backward pass instead of keeping its
        activations, and (under FSDP) its gathered weights, from the forward pass. With a `dropout_key`
        (training steps, where `dropout` > 0) each sub-block's output is dropped at that rate; without one nothing is.
        """
        attn, pos = self.self_attention_inputs(editor_mask)
        x = self.embed_tokens(editor_ids)
        valid = editor_mask > 0
        for i, block in enumerate(self.layers):
            drop = () if dropout_key is None else (jax.random.fold_in(dropout_key, i), dropout)
            x = (remat_module(block) if remat else block)(x, attn, valid, source, base, *drop)
        return self.norm(x), pos


def copy_from_target(hypernet: HyperNetwork, target) -> None:
    """Initialises the editor from the target (§3.1): embedding, final norm, and blocks 0..N-1.

    Cross-attention projections start as independent copies of the block's self-attention weights,
    their norms as copies of its input norm. With init="scratch" only the embedding and final norm
    are copied.
    """
    def put(dst: nnx.Param, src: nnx.Param):
        dst[...] = jnp.asarray(src[...], dst[...].dtype)

    put(hypernet.embed_tokens.embedding, target.embed_tokens.embedding)
    put(hypernet.norm.weight, target.norm.weight)
    if hypernet.hyper.init == "scratch":
        return
    for block, src in zip(hypernet.layers, target.layers):
        attns = [block.self_attn]
        norms = [block.input_layernorm]
        if block.use_source:
            attns.append(block.source_cross_attn)
            norms.append(block.source_cross_attn_layernorm)
        if block.use_base:
            attns.append(block.base_cross_attn)
            norms.append(block.base_cross_attn_layernorm)
        for attn in attns:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                put(getattr(attn, name).kernel, getattr(src.self_attn, name).kernel)
        for norm in norms:
            put(norm.weight, src.input_layernorm.weight)
        put(block.post_attention_layernorm.weight, src.post_attention_layernorm.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            put(getattr(block.mlp, name).kernel, getattr(src.mlp, name).kernel)
