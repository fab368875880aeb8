"""Analytic matmul FLOPs of the target's forward and the measured matmul peaks they are held against
(tools/bench_forward.py, tools/bench_train_step.py).

FLOPs count matmuls only (2·m·n·k each); norms, RoPE, softmax and elementwise work are left out
(XLA's own cost analysis of our SmolLM2-shaped forward is within 1 % of the count). A forward
that runs every product at the measured peak of one large product is as fast as this machine
allows, so `ceiling` bounds the speed-up over another implementation that any kernel tuning could show.
"""

from __future__ import annotations

import statistics
import time

from hyperdas_jax.config import ModelConfig

PEAK_SIZE = 2048  # the n of the n×n×n product whose speed is "the matmul peak"


def block_flops(t: ModelConfig, tokens: int, seq: int) -> float:
    """Forward FLOPs of one Llama block over `tokens` rows of sequences `seq` long: the q/k/v/o projections,
    the MLP, and the full seq×seq attention scores and weighted values (a causal mask does not skip them,
    in our forward or in torch's SDPA)."""
    d, n, nk, h, f = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.intermediate_size
    proj = 2 * d * (2 * n * h + 2 * nk * h)  # q, o + k, v per token
    mlp = 2 * 3 * d * f
    return tokens * (proj + mlp + 2 * 2 * seq * n * h)


def forward_flops(t: ModelConfig, batch: int, tokens: int, *, logits: bool = True) -> float:
    """FLOPs of one forward over a (batch, tokens) id array: every block, and the LM head at every position
    when `logits` (the hidden-states-only forward stops at the final norm)."""
    rows = batch * tokens
    head = 2 * rows * t.hidden_size * t.vocab_size if logits else 0
    return t.num_hidden_layers * block_flops(t, rows, tokens) + head


def median_seconds(fn, runs: int, warmup: int = 1) -> float:
    """Median wall seconds of `runs` calls of `fn` after `warmup` untimed ones (compile, caches)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def xla_matmul_peak(dtype: str = "float32", n: int = PEAK_SIZE, runs: int = 5) -> float:
    """FLOP/s of one jitted n×n×n product (median of `runs`). A bfloat16 product accumulates in and returns
    float32, as every bfloat16 `Linear` of ours does (models/layers.py, `low_precision_matmul`)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    return 2 * n**3 / median_seconds(lambda: f(a, a).block_until_ready(), runs)


def torch_matmul_peak(dtype: str = "float32", n: int = PEAK_SIZE, runs: int = 5) -> float:
    """FLOP/s of one torch n×n×n product in `dtype` with torch's current thread count (median of `runs`)."""
    import torch

    a = torch.ones((n, n), dtype=getattr(torch, dtype))
    with torch.inference_mode():
        return 2 * n**3 / median_seconds(lambda: torch.mm(a, a), runs)


def ceiling(torch_s: float, flops: float, peak: float) -> float:
    """The speed-up over torch's `torch_s` that a forward of `flops` would show if all of it ran at `peak` FLOP/s."""
    return torch_s / (flops / peak)
