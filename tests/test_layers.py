"""low_precision_matmul and Linear's compute dtype against float64 numpy references."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from hyperdas_jax.models.layers import Linear, low_precision_matmul
from hyperdas_jax.sharding import create_sharded

BF16 = ml_dtypes.bfloat16
ULP = 2.0 ** -7  # bfloat16's relative rounding step (8 significand bits)


def _bf16(a):
    return np.asarray(a, np.float32).astype(BF16)


def _ref(a):
    """A float64 product rounded once to bfloat16, as float64 for comparison."""
    return a.astype(BF16).astype(np.float64)


def test_low_precision_matmul_forward_and_gradients_match_float64_rounded_once():
    rng = np.random.RandomState(0)
    x, w, g = (_bf16(rng.randn(*s)) for s in ((3, 40, 96), (96, 72), (3, 40, 72)))
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))

    y, vjp = jax.vjp(low_precision_matmul, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    for got, want in ((y, x64 @ w64), (dx, g64 @ w64.T), (dw, np.einsum("btd,btf->df", x64, g64))):
        got = np.asarray(got, np.float64)
        # accumulated in float32 and rounded once: at most one bfloat16 step from the exact product's rounding
        np.testing.assert_allclose(got, _ref(want), rtol=ULP, atol=1e-6 * np.abs(want).max())
        # a bfloat16 accumulation over 96 / 120 terms would drift by several steps
        assert np.mean(got == _ref(want)) > 0.9


def test_linear_in_bfloat16_tracks_float32_and_keeps_float32_gradients():
    x = jnp.asarray(np.random.RandomState(1).randn(4, 8, 64), jnp.float32)
    lin32, lin16 = (create_sharded(lambda dt=dt: Linear(64, 48, ("embed", "mlp"), param_dtype=jnp.float32, dtype=dt,
                                                        rngs=nnx.Rngs(0))) for dt in (jnp.float32, jnp.bfloat16))

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x).astype(jnp.float32)))

    (l32, (g32, gx32)), (l16, (g16, gx16)) = (
        (loss(m, x), jax.grad(lambda m, x: loss(m, x), argnums=(0, 1))(m, x)) for m in (lin32, lin16))
    assert lin16(x).dtype == jnp.bfloat16 and lin32(x).dtype == jnp.float32
    k32, k16 = g32.kernel[...], g16.kernel[...]
    assert k16.dtype == jnp.float32 and gx16.dtype == jnp.float32  # master weights and inputs keep their dtype
    assert abs(float(l16) - float(l32)) < 0.02 * abs(float(l32)) + 0.5
    np.testing.assert_allclose(np.asarray(k16), np.asarray(k32), atol=0.03 * np.abs(np.asarray(k32)).max())
    np.testing.assert_allclose(np.asarray(gx16), np.asarray(gx32), atol=0.03 * np.abs(np.asarray(gx32)).max())
    # float32 compute is the plain product, unchanged
    np.testing.assert_allclose(np.asarray(lin32(x)), np.asarray(x) @ np.asarray(lin32.kernel[...]), rtol=1e-5,
                               atol=1e-5)
