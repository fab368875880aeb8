"""Llama building blocks: Linear, Embed, RMSNorm, RoPE (HF rotate-half), grouped-query attention, SwiGLU MLP.

Dimension legend used in einsum strings and shape comments:
  b batch, t query positions, s key positions, d model, n query heads, k kv heads,
  g query heads per kv head (n = k*g), h head dim, f mlp, v vocab.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyperdas_jax.config import ModelConfig
from hyperdas_jax.sharding import constrain

_MASK_VALUE = float(np.finfo(np.float32).min)  # finite, so fully masked rows give a uniform softmax, not NaN


def torch_linear_init(key, shape, dtype):
    """PyTorch's nn.Linear default init for an [in, out] kernel: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


@jax.custom_vjp
def low_precision_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., d) @ w (d, f) -> (..., f) for low-precision x, w of one dtype (e.g. bfloat16).

    Every product (the forward and both gradients) accumulates in float32 and is rounded to the
    operands' dtype once. XLA:CPU multiplies bfloat16 matrices about 2x faster than float32 ones on
    CPUs with AVX-512 BF16 only when asked for a float32 result; a bfloat16 result, and autodiff's
    transposes of a float32-result product, take a path no faster than float32's.
    """
    return jnp.einsum("...d,df->...f", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _low_precision_matmul_fwd(x, w):
    return low_precision_matmul(x, w), (x, w)


def _low_precision_matmul_bwd(residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)  # (..., f)
    dx = jnp.einsum("...f,df->...d", g, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum("...d,...f->df", x, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


class Linear(nnx.Module):
    """Bias-free linear map; `kernel` is [in, out] (HF's `weight` transposed).

    In float32 a plain product; in a lower compute dtype `low_precision_matmul` (float32 accumulation).
    """

    def __init__(self, din: int, dout: int, axes: tuple[str, str], *, param_dtype, dtype, rngs: nnx.Rngs,
                 init=torch_linear_init):
        self.kernel = nnx.Param(init(rngs.params(), (din, dout), param_dtype), out_sharding=axes)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x, w = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        if jnp.dtype(self.dtype) == jnp.float32:
            return jnp.einsum("...d,df->...f", x, w)
        return low_precision_matmul(x, w)


class Embed(nnx.Module):
    """Token embedding table `embedding` [v, d] (HF `embed_tokens.weight`)."""

    def __init__(self, vocab: int, dim: int, *, param_dtype, dtype, rngs: nnx.Rngs):
        init = jax.random.normal(rngs.params(), (vocab, dim), jnp.float32).astype(param_dtype)
        self.embedding = nnx.Param(init, out_sharding=("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)  # (b, t, d)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied LM head: logits in float32."""
        return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: statistics in float32, normalised value cast back, then scaled by `weight`."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


# --------------------------------------------------------------------------------------------
# RoPE


@functools.lru_cache(maxsize=64)
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies (h/2,), float32, computed with HF's float32 arithmetic (default and llama3)."""
    dim = cfg.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)).astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(s.factor), inv_freq).astype(np.float32)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables (b, t, h) for integer positions (b, t), float32, HF's cat(freqs, freqs) layout."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (b, t, h/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # (b, t, h)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF rotate-half RoPE on x (b, t, n, h) with cos/sin (b, t, h), in x's dtype."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


class AttnInputs(NamedTuple):
    """Everything a block needs besides the residual stream: the boolean mask and RoPE tables."""

    mask: jax.Array  # (b, t, s) bool: query t may attend to key s
    cos: jax.Array  # (b, t, h) float32
    sin: jax.Array  # (b, t, h) float32


def causal_inputs(attention_mask: jax.Array, position_ids: jax.Array, inv_freq: np.ndarray) -> AttnInputs:
    """Causal self-attention inputs from a key padding mask (b, t) and position ids (b, t).

    Causality is by index (as HF's cache_position), so left padding works with any position ids.
    """
    t = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # (t, s)
    mask = causal[None] & (attention_mask[:, None, :] > 0)  # (b, t, s)
    cos, sin = rope_tables(position_ids, inv_freq)
    return AttnInputs(mask, cos, sin)


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """Real tokens numbered 0, 1, 2, ... whatever the left padding; pads get 0."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Attention and MLP


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention core.

    Args:
      q: (b, t, n, h) rotated queries.
      k: (b, s, k, h) rotated keys.
      v: (b, s, k, h) values.
      mask: (b, t, s) bool, True where attention is allowed.
    Returns:
      (b, t, n, h) in v's dtype. Scores and softmax are float32 (HF eager also softmaxes in float32).
    """
    b, t, n, h = q.shape
    nk = k.shape[2]
    q = q.reshape(b, t, nk, n // nk, h)  # (b, t, k, g, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(h)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)  # (b, k, g, t, s)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)  # (b, t, k, g, h)
    return out.reshape(b, t, n, h)


class Attention(nnx.Module):
    """Llama GQA attention with HF-mirrored projections q_proj, k_proj, v_proj, o_proj (no biases).

    The same module serves self-attention (keys from x) and cross-attention (keys from `kv`,
    with their own RoPE tables), which the hypernetwork uses.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, init=torch_linear_init):
        d, n, nk, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype), rngs=rngs, init=init)
        self.q_proj = Linear(d, n * h, ("embed", "heads"), **kw)
        self.k_proj = Linear(d, nk * h, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, nk * h, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(n * h, d, ("heads", "embed"), **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = n, nk, h

    def __call__(self, x: jax.Array, attn: AttnInputs, kv: jax.Array | None = None,
                 kv_rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """x (b, t, d) -> (b, t, d). `kv` (b, s, d) and `kv_rope` (cos, sin (b, s, h)) for cross-attention."""
        b, t, _ = x.shape
        src = x if kv is None else kv
        s = src.shape[1]
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)  # (b, t, n, h)
        k = self.k_proj(src).reshape(b, s, self.num_kv_heads, self.head_dim)  # (b, s, k, h)
        v = self.v_proj(src).reshape(b, s, self.num_kv_heads, self.head_dim)  # (b, s, k, h)
        q = apply_rope(q, attn.cos, attn.sin)
        k_cos, k_sin = (attn.cos, attn.sin) if kv_rope is None else kv_rope
        k = apply_rope(k, k_cos, k_sin)
        out = dot_product_attention(q, k, v, attn.mask)  # (b, t, n, h)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, dim: int, hidden: int, *, param_dtype, dtype, rngs: nnx.Rngs, init=torch_linear_init):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs, init=init)
        self.gate_proj = Linear(dim, hidden, ("embed", "mlp"), **kw)
        self.up_proj = Linear(dim, hidden, ("embed", "mlp"), **kw)
        self.down_proj = Linear(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)  # (..., f)
        hidden = constrain(hidden, ("batch", "seq", "mlp")) if hidden.ndim == 3 else hidden
        return self.down_proj(hidden)


class DecoderLayer(nnx.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, param_dtype=pd, dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array, attn: AttnInputs) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), attn)
        x = x + self.mlp(self.post_attention_layernorm(x))
        # Activations keep the model axis whole: "embed" names the fsdp-sharded axis of *parameters*.
        return constrain(x, ("batch", "seq", None))


# --------------------------------------------------------------------------------------------
# Rematerialisation


def remat_module(module: nnx.Module):
    """`module(*args)` recomputed in the backward pass, its weights used just in time.

    Like `jax.checkpoint`, only the inputs are kept for the backward pass. In addition an
    optimization barrier ties the module's weights to its inputs in the forward pass and to the
    incoming cotangent in the backward pass: under FSDP the weights' all-gather then happens when
    the block runs, instead of being hoisted, with every other block's, to the start of a pass
    (or shared between passes), which would keep every gathered block alive at once. A plain
    function of (graphdef, state), so it works on modules merged in an outer trace.
    """
    graphdef, state = nnx.split(module)
    specs = nnx.get_partition_spec(state)

    def call(state, *args):
        # Pin the weights to their parameter layout after the barrier; otherwise sharding
        # propagation passes through the barrier and puts the all-gather in front of it.
        state = jax.tree.map(lambda x, spec: constrain(x, tuple(spec)), state, specs)
        return nnx.merge(graphdef, state)(*args)

    @jax.custom_vjp
    def run(state, *args):
        return call(*jax.lax.optimization_barrier((state, *args)))

    def fwd(state, *args):
        return run(state, *args), (state, args)

    def bwd(residuals, ct):
        state, args = residuals
        state, args, ct = jax.lax.optimization_barrier((state, args, ct))
        return jax.vjp(call, state, *args)[1](ct)  # unused cotangents (frozen weights, masks) are dead code

    run.defvjp(fwd, bwd)
    return lambda *args: run(state, *args)
