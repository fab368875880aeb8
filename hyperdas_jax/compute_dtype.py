"""`dtype: auto`: the compute dtype chosen at start-up for the machine a run is on.

On GPUs and TPUs `auto` is bfloat16 (float32 accumulation in every matrix product, float32 master
weights). On a CPU it is bfloat16 only where this CPU multiplies bfloat16 matrices at least
`MIN_SPEEDUP` times faster than float32 ones (the AVX-512 BF16 kind does, about 2x; others may take
a path no faster than float32's), measured once per process on one product of a fixed shape
(512 x 576 x 1536, SmolLM2's MLP); float32 otherwise. A CPU job of several processes uses float32, so
every process builds the same program. Storage dtypes (`param_dtype`) never change.
"""

from __future__ import annotations

import functools
import time

AUTO = "auto"
MIN_SPEEDUP = 1.3


def bfloat16_matmul_speedup(m: int = 512, k: int = 576, f: int = 1536, reps: int = 15) -> float:
    """float32 time / bfloat16 time of one jitted (m, k) x (k, f) product on the default device (best of `reps`)."""
    import jax
    import jax.numpy as jnp

    from hyperdas_jax.models.layers import low_precision_matmul

    def best(fn, dtype) -> float:
        x, w = jnp.ones((m, k), dtype), jnp.ones((k, f), dtype)
        fn(x, w).block_until_ready()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn(x, w).block_until_ready()
            times.append(time.perf_counter() - t)
        return min(times)

    with jax.ensure_compile_time_eval():  # measured for real even when first asked inside a trace
        f32 = best(jax.jit(lambda x, w: jnp.einsum("td,df->tf", x, w)), jnp.float32)
        bf16 = best(jax.jit(low_precision_matmul), jnp.bfloat16)
    return f32 / bf16


@functools.cache
def _auto() -> tuple[str, str]:
    import jax

    platform = jax.default_backend()
    if platform != "cpu":
        return "bfloat16", f"auto: {platform}"
    if jax.process_count() > 1:
        return "float32", "auto: a multi-process CPU job"
    speedup = bfloat16_matmul_speedup()
    dtype = "bfloat16" if speedup >= MIN_SPEEDUP else "float32"
    return dtype, f"auto: bfloat16 matmul {speedup:.2f}x float32 on this CPU, {MIN_SPEEDUP}x needed"


def resolve(dtype: str) -> str:
    """`dtype`, with `auto` replaced by this machine's choice."""
    return _auto()[0] if dtype == AUTO else dtype


def describe(dtype: str) -> str:
    """The resolved dtype and, for `auto`, why: e.g. "bfloat16 (auto: bfloat16 matmul 1.96x float32 ...)"."""
    return f"{_auto()[0]} ({_auto()[1]})" if dtype == AUTO else dtype
