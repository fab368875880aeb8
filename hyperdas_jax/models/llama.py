"""The target Llama (HF-mirrored names) with full, span and hidden-states-only forwards.

Hidden-state convention (HF's `output_hidden_states`): `hs[0]` is the token embedding,
`hs[l]` for 1 <= l < n is the raw residual stream after block l-1, and the last entry
`hs[n]` is the output of the final RMSNorm (as in HF). The *raw* output of the last block is
what `run_layers(..., stop=n)` returns.

HyperDAS patches the raw residual `hs[L]` and continues with `run_layers(h, start=L)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hyperdas_jax.config import ModelConfig
from hyperdas_jax.models.layers import (
    AttnInputs,
    DecoderLayer,
    Embed,
    Linear,
    RMSNorm,
    causal_inputs,
    default_position_ids,
    rope_inv_freq,
)


class Llama(nnx.Module):
    """LlamaForCausalLM. Parameter paths mirror HF with `model.` dropped: `embed_tokens`, `layers[i]...`, `norm`, `lm_head`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=pd, dtype=dt, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), param_dtype=pd, dtype=dt,
                                  rngs=rngs)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    # -- pieces -------------------------------------------------------------------------------

    def attn_inputs(self, attention_mask: jax.Array, position_ids: jax.Array | None = None) -> AttnInputs:
        """Mask and RoPE tables for a (b, t) key padding mask; default positions number real tokens from 0."""
        attention_mask = jnp.asarray(attention_mask)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        return causal_inputs(attention_mask, jnp.asarray(position_ids), rope_inv_freq(self.config))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """(b, t) ids -> (b, t, d) = hs[0]."""
        return self.embed_tokens(jnp.asarray(input_ids))

    def run_layers(self, h: jax.Array, attn: AttnInputs, start: int = 0, stop: int | None = None,
                   *, collect: bool = False):
        """Runs blocks [start, stop) from the residual stream h (b, t, d) = hs[start].

        Returns:
          the raw residual after block stop-1, and with `collect=True` also the list of
          residuals after each block run (hs[start+1] ... hs[stop], all pre-final-norm).
        """
        stop = self.num_layers if stop is None else stop
        if not 0 <= start <= stop <= self.num_layers:
            raise ValueError(f"invalid block span [{start}, {stop}) for {self.num_layers} layers")
        outs = []
        for layer in self.layers[start:stop]:
            h = layer(h, attn)
            if collect:
                outs.append(h)
        return (h, outs) if collect else h

    def residual_stream(self, input_ids: jax.Array, attention_mask: jax.Array, layer: int) -> jax.Array:
        """The raw residual stream entering block `layer` (b, t, d) (hs[layer] for layer < n): blocks [0, layer)."""
        return self.run_layers(self.embed(input_ids), self.attn_inputs(attention_mask), 0, layer)

    def unembed(self, h: jax.Array) -> jax.Array:
        """Final norm + LM head on raw residuals (..., d) -> float32 logits (..., v)."""
        return self.lm_logits(self.norm(h))

    def lm_logits(self, x: jax.Array) -> jax.Array:
        """The LM head alone on final-normed states (..., d) (hs[n]) -> float32 logits (..., v)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(x)
        return jnp.einsum("...d,dv->...v", x, self.lm_head.kernel[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)

    # -- whole-model entry points ---------------------------------------------------------------

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None) -> jax.Array:
        """All n+1 hidden states in HF's convention, stacked (n+1, b, t, d); no LM head is computed."""
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attn = self.attn_inputs(attention_mask, position_ids)
        h0 = self.embed(input_ids)
        h, outs = self.run_layers(h0, attn, collect=True)
        return jnp.stack([h0, *outs[:-1], self.norm(h)])

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, output_hidden_states: bool = False):
        """Logits (b, t, v) float32, and with `output_hidden_states` the stacked (n+1, b, t, d) states."""
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attn = self.attn_inputs(attention_mask, position_ids)
        h0 = self.embed(input_ids)
        if not output_hidden_states:
            return self.unembed(self.run_layers(h0, attn))
        h, outs = self.run_layers(h0, attn, collect=True)
        return self.unembed(h), jnp.stack([h0, *outs[:-1], self.norm(h)])


def init_llama(cfg: ModelConfig, seed: int = 0) -> Llama:
    """A randomly initialised model (parameters placed by the current mesh, if any)."""
    return Llama(cfg, rngs=nnx.Rngs(seed))
