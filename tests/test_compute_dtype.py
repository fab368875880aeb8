"""`dtype: auto`: resolved once per process from a measured bfloat16 / float32 matmul speed-up."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from hyperdas_jax import compute_dtype
from hyperdas_jax.config import load_config
from hyperdas_jax.models.hyperdas import HyperDAS
from hyperdas_jax.sharding import abstract_module
from hyperdas_jax.target import target_model_config

SMALL = ["target.random.num_hidden_layers=2", "intervention.layer=1", "hypernet.num_layers=1"]


@pytest.fixture
def speedup(monkeypatch):
    """Sets the measured speed-up `auto` sees; the per-process choice is recomputed around each test."""
    def set_to(value):
        monkeypatch.setattr(compute_dtype, "bfloat16_matmul_speedup", lambda: value)
        compute_dtype._auto.cache_clear()

    yield set_to
    compute_dtype._auto.cache_clear()


def test_the_speedup_is_measured_on_this_machine():
    got = compute_dtype.bfloat16_matmul_speedup(m=64, k=64, f=64, reps=3)
    assert 0.01 < got < 100


@pytest.mark.parametrize("measured, want", [(2.0, "bfloat16"), (1.3, "bfloat16"), (1.29, "float32"),
                                            (0.8, "float32")])
def test_auto_takes_bfloat16_only_where_it_is_measurably_faster(speedup, measured, want):
    speedup(measured)
    assert compute_dtype.resolve("auto") == want
    assert compute_dtype.describe("auto").startswith(f"{want} (auto: bfloat16 matmul {measured:.2f}x float32")
    for fixed in ("float32", "bfloat16", "float16"):  # explicit dtypes are never changed
        assert compute_dtype.resolve(fixed) == fixed == compute_dtype.describe(fixed)


@pytest.mark.parametrize("measured, want", [(2.0, jnp.bfloat16), (1.0, jnp.float32)])
def test_auto_reaches_the_target_and_the_hypernetwork(speedup, measured, want):
    speedup(measured)
    cfg = load_config("configs/tiny.yaml", SMALL + ["target.dtype=auto", "hypernet.dtype=auto"])
    tcfg = target_model_config(cfg)
    assert jnp.dtype(tcfg.dtype) == want and tcfg.param_dtype == "float32"
    model = nnx.merge(*abstract_module(lambda: HyperDAS(tcfg, cfg, rngs=nnx.Rngs(0))))
    assert jnp.dtype(model.hypernet.config.dtype) == want
    assert model.hypernet.layers[0].mlp.up_proj.dtype == want
    # master weights stay float32 whatever the compute dtype
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}


def test_auto_may_first_be_asked_inside_a_trace():
    """Modules are often built under jax.eval_shape (abstract_module): the measurement must still run for real."""
    compute_dtype._auto.cache_clear()
    seen = []
    try:
        jax.eval_shape(lambda x: seen.append(compute_dtype.describe("auto")) or x, jnp.ones(2))
    finally:
        compute_dtype._auto.cache_clear()
    assert seen[0].split(" (")[0] in ("float32", "bfloat16") and "x float32 on this CPU" in seen[0]
