"""Orthonormal parametrisation, subspace modules and the interchange against a numpy reference of §5–§6."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hyperdas_jax.config import ModelConfig
from hyperdas_jax.models.intervention import (
    DAS,
    BoundlessDAS,
    MaskSelect,
    NoSubspace,
    Orthonormal,
    ReflectSelect,
    make_subspace,
    mix_sources,
    temperature,
)
from hyperdas_jax.sharding import create_sharded

CFG = ModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
D, K, F = 64, 8, 48
B, TS, TB = 2, 3, 5
TAU = 0.7
KIND_CLASSES = {"reflect": ReflectSelect, "das": DAS, "mask": MaskSelect, "boundless": BoundlessDAS,
                "none": NoSubspace}


@pytest.fixture(scope="module")
def modules():
    return {kind: create_sharded(lambda kind=kind: make_subspace(kind, CFG, K, F, rngs=nnx.Rngs(7)))
            for kind in KIND_CLASSES}


@nnx.jit
def _apply(module, z, base, mix, tau):
    return module(z, base, mix, temperature=tau)


@nnx.jit
def _rotation(layer):
    return layer()


def _data(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(B, D))
    base = rng.normal(size=(B, TB, D))
    src = rng.normal(size=(B, TS, D))
    logits = rng.normal(size=(B, TS + 1, TB)) * 2
    a = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    a[0, :, 1] = [0, 0, 0, 1]  # an untouched column
    a = a.astype(np.float32)
    return z, base, src, a, [jnp.asarray(x, dtype) for x in (z, base, src)] + [jnp.asarray(a)]


# --------------------------------------------------------------------------------------------
# Frozen numpy references


def _np(x):
    return np.asarray(x, np.float64)


def _rms_np(x, w, eps=1e-5):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _swiglu_np(x, mlp):
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    gate, up, down = (_np(p.kernel[...]) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    return (silu(x @ gate) * (x @ up)) @ down


def _mix_np(a, base, src):
    out = np.zeros_like(base)
    for b in range(base.shape[0]):
        for j in range(base.shape[1]):
            out[b, j] = sum(a[b, i, j] * src[b, i] for i in range(src.shape[1])) + a[b, -1, j] * base[b, j]
    return out


def reference_patch(kind, module, z, base, src, a, tau):
    """§6: ŝ_j = Σ_i A_ij s_i + A_SELF,j b_j, then b_j + (ŝ_j − b_j) W diag(m) Wᵀ with dense matrices."""
    mix = _mix_np(a, base, src)
    if kind == "none":
        return mix
    r = _np(_rotation(module.rotate_layer))
    out = np.zeros_like(base)
    for b in range(base.shape[0]):
        w, m = r, np.ones(r.shape[1])
        if kind == "reflect":
            g = _swiglu_np(_rms_np(z[b], _np(module.rv_norm.weight[...])), module.rv_proj)
            u = g / np.linalg.norm(g)
            w = (np.eye(D) - 2 * np.outer(u, u)) @ r
        elif kind == "mask":
            logits = _swiglu_np(_rms_np(z[b], _np(module.mask_norm.weight[...])), module.mask_projection)
            m = 1 / (1 + np.exp(-logits / tau))
        elif kind == "boundless":
            m = 1 / (1 + np.exp(-(float(module.mask_projection.boundary[...]) * D - np.arange(D)) / tau))
        out[b] = base[b] + (mix[b] - base[b]) @ w @ np.diag(m) @ w.T
    return out


# --------------------------------------------------------------------------------------------
# Orthonormal R


@pytest.mark.parametrize("kind,k", [("reflect", K), ("boundless", D)])
def test_orthonormal_columns_and_householder_form(modules, kind, k):
    layer = nnx.clone(modules[kind].rotate_layer)  # k < D from ReflectSelect, k = D from BoundlessDAS
    r = np.asarray(_rotation(layer))
    assert r.shape == (D, k) and r.dtype == np.float32
    np.testing.assert_allclose(r.T.astype(np.float64) @ r, np.eye(k), atol=1e-5)
    # The compact form equals the explicit product of k reflections with v_i = e_i + strict-lower column i.
    x = _np(layer.reflectors[...])
    q = np.eye(D)
    for i in range(k):
        v = np.tril(x, -1)[:, i] + np.eye(D)[:, i]
        q = q @ (np.eye(D) - 2 * np.outer(v, v) / (v @ v))
    np.testing.assert_allclose(r, q[:, :k], atol=1e-5)
    assert np.abs(r).max() < 0.9  # a random frame, not (signed) coordinate axes
    # Still orthonormal after a large move of the free parameters.
    layer.reflectors[...] = layer.reflectors[...] + 3.0 * jax.random.normal(jax.random.key(1), (D, k))
    r = np.asarray(_rotation(layer), np.float64)
    np.testing.assert_allclose(r.T @ r, np.eye(k), atol=1e-5)


def test_rotation_is_float32_under_bf16_model():
    cfg = dataclasses.replace(CFG, param_dtype="bfloat16", dtype="bfloat16")
    m = create_sharded(lambda: ReflectSelect(cfg, K, F, rngs=nnx.Rngs(0)))
    assert m.rotate_layer.reflectors[...].dtype == jnp.float32
    assert m.rv_proj.gate_proj.kernel[...].dtype == jnp.bfloat16
    _, _, _, _, (zj, base, src, a) = _data()
    out = _apply(m, zj.astype(jnp.bfloat16), base.astype(jnp.bfloat16),
                 mix_sources(a, base, src).astype(jnp.bfloat16), TAU)
    assert out.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out, np.float32)).all()


def test_reflect_basis_is_dense_householder_times_r(modules):
    m = modules["reflect"]
    z = jnp.asarray(np.random.default_rng(5).normal(size=(B, D)), jnp.float32)
    u, w = nnx.jit(lambda m, z: (m.reflection_vector(z), m.basis(z)))(m, z)
    u, w = _np(u), np.asarray(w)
    np.testing.assert_allclose(np.linalg.norm(u, axis=-1), 1.0, atol=1e-6)
    r = _np(_rotation(m.rotate_layer))
    assert w.shape == (B, D, K)
    for b in range(B):
        np.testing.assert_allclose(w[b].T.astype(np.float64) @ w[b], np.eye(K), atol=1e-5)
        np.testing.assert_allclose(w[b], (np.eye(D) - 2 * np.outer(u[b], u[b])) @ r, atol=1e-6)
    assert np.abs(w[0] - w[1]).max() > 1e-3  # instruction-dependent


# --------------------------------------------------------------------------------------------
# The interchange


@pytest.mark.parametrize("kind", list(KIND_CLASSES))
def test_patch_matches_numpy_reference(modules, kind):
    m = modules[kind]
    assert type(m) is KIND_CLASSES[kind]
    z, base, src, a, (zj, bj, sj, aj) = _data()
    mix = mix_sources(aj, bj, sj)
    np.testing.assert_allclose(np.asarray(mix), _mix_np(a, base, src), atol=1e-5)
    got = np.asarray(_apply(m, zj, bj, mix, TAU))
    want = reference_patch(kind, m, z, base, src, a, TAU)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(want - base).max() > 1e-2  # the patch actually changes something
    np.testing.assert_array_equal(got[0, 1], np.asarray(bj)[0, 1])  # the A[SELF] = 1 column is untouched


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_self_everywhere_leaves_base_exactly(modules, dtype):
    _, _, _, _, (z, base, src, _) = _data(seed=1, dtype=dtype)
    a = jnp.zeros((B, TS + 1, TB), jnp.float32).at[:, TS].set(1.0)
    mix = mix_sources(a, base, src)
    assert mix.dtype == dtype
    for kind, m in modules.items():
        out = _apply(m, z, base, mix, TAU)
        assert out.dtype == dtype
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(base, np.float32), err_msg=kind)


def test_full_rank_das_copies_the_selected_source_vector():
    m = create_sharded(lambda: DAS(CFG, D, rngs=nnx.Rngs(2)))
    _, base, src, _, (z, bj, sj, _) = _data(seed=2)
    a = np.zeros((B, TS + 1, TB), np.float32)
    a[:, TS] = 1.0
    a[0, 2, 3], a[0, TS, 3] = 1.0, 0.0  # base position 3 of example 0 takes source token 2
    a[1, 0, 0], a[1, TS, 0] = 1.0, 0.0
    out = np.asarray(_apply(m, z, bj, mix_sources(jnp.asarray(a), bj, sj), TAU))
    want = base.astype(np.float32).copy()
    want[0, 3], want[1, 0] = src[0, 2], src[1, 0]
    np.testing.assert_allclose(out, want, atol=1e-5)


def assert_gradients_reach(grads, parts) -> dict[str, np.ndarray]:
    """Every part has gradient leaves, all finite and not all zero; returns the leaves by key path."""
    flat = {jax.tree_util.keystr(path): np.asarray(g) for path, g in jax.tree.leaves_with_path(grads)}
    for part in parts:
        leaves = [g for path, g in flat.items() if path.startswith(f"['{part}']")]
        assert leaves, (part, list(flat))
        for g in leaves:
            assert np.isfinite(g).all() and np.abs(g).max() > 0, part
    return flat


@pytest.mark.parametrize("kind,trained", [
    ("reflect", ["rotate_layer", "rv_proj"]),
    ("das", ["rotate_layer"]),
    ("mask", ["rotate_layer", "mask_projection"]),
    ("boundless", ["rotate_layer", "mask_projection"]),
])
def test_gradients_reach_every_trained_part(modules, kind, trained):
    m = modules[kind]
    _, _, _, _, (z, base, src, a) = _data(seed=3)
    weights = jnp.asarray(np.random.default_rng(4).normal(size=base.shape), jnp.float32)
    gd, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(p, a):
        out = nnx.merge(gd, p, rest)(z, base, mix_sources(a, base, src), temperature=1.0)
        return jnp.sum(out * weights)

    grads, grad_a = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, a)
    assert np.isfinite(np.asarray(grad_a)).all() and np.abs(np.asarray(grad_a)).max() > 0
    flat = assert_gradients_reach(grads, trained)
    if kind == "boundless":
        assert "['mask_projection']['boundary'].value" in flat


def test_module_layout_and_errors(modules):
    assert modules["reflect"].rotate_layer.reflectors[...].shape == (D, K)
    assert modules["boundless"].rotate_layer.reflectors[...].shape == (D, D)
    assert modules["mask"].mask_projection.down_proj.kernel[...].shape == (F, K)
    assert modules["reflect"].rv_proj.down_proj.kernel[...].shape == (F, D)
    _, _, _, _, (z, base, _, _) = _data()
    for kind in ("mask", "boundless"):
        with pytest.raises(ValueError, match="temperature"):
            modules[kind](z, base, base)
    with pytest.raises(ValueError):
        make_subspace("rotate", CFG, K, F, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
        Orthonormal(D, D + 1, rngs=nnx.Rngs(0))


def test_temperature_schedule():
    assert float(temperature(0, 100)) == pytest.approx(50.0)
    assert float(temperature(100, 100)) == pytest.approx(0.1, abs=1e-7)
    assert float(temperature(50, 100)) == pytest.approx(25.05, abs=1e-5)
    assert float(temperature(500, 100)) == pytest.approx(0.1, abs=1e-7)  # clamped past the end
    f = jax.jit(lambda s: temperature(s, 10, start=2.0, end=1.0))
    assert float(f(jnp.asarray(4))) == pytest.approx(np.linspace(2.0, 1.0, 11)[4], abs=1e-6)


# --------------------------------------------------------------------------------------------
# ReflectSelect with several reflections (beyond the paper)


def _principal_angles(w0, w1):
    return np.arccos(np.clip(np.linalg.svd(w0.T @ w1, compute_uv=False), -1.0, 1.0))


@pytest.mark.parametrize("m", [1, 3])
def test_several_reflections_match_dense_product(m):
    mod = create_sharded(lambda: make_subspace("reflect", CFG, K, F, reflections=m, rngs=nnx.Rngs(11)))
    assert mod.rv_proj.down_proj.kernel[...].shape == (F, m * D)
    z, base, src, a, (zj, bj, sj, aj) = _data(seed=6)
    r = _np(_rotation(mod.rotate_layer))
    g = np.stack([_swiglu_np(_rms_np(z[b], _np(mod.rv_norm.weight[...])), mod.rv_proj) for b in range(B)])
    u = g.reshape(B, m, D) / np.linalg.norm(g.reshape(B, m, D), axis=-1, keepdims=True)
    mix = _mix_np(a, base, src)
    dense = []
    for b in range(B):
        w = r
        for i in range(m):  # H_1 acts first: W = H_m···H_1 R
            w = (np.eye(D) - 2 * np.outer(u[b, i], u[b, i])) @ w
        dense.append(w)
        np.testing.assert_allclose(w.T @ w, np.eye(K), atol=1e-5)
    got_u, got_w = nnx.jit(lambda mod, z: (mod.reflection_vectors(z), mod.basis(z)))(mod, zj)
    np.testing.assert_allclose(np.asarray(got_u), u, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_w), np.stack(dense), atol=1e-5)
    got = np.asarray(_apply(mod, zj, bj, mix_sources(aj, bj, sj), TAU))
    want = np.stack([base[b] + (mix[b] - base[b]) @ dense[b] @ dense[b].T for b in range(B)])
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Two examples' subspaces differ in at most 2m directions (the rest of span(R) is fixed by every H).
    moved = int((_principal_angles(dense[0], dense[1]) > 1e-2).sum())  # float32 R: noise ~1e-3
    assert 0 < moved <= 2 * m
    if m == 3:
        assert moved > 2  # more than one reflection can ever move
        with pytest.raises(ValueError, match="reflection_vectors"):
            mod.reflection_vector(zj)


def test_several_reflections_gradients_and_single_reflection_equivalence():
    one = create_sharded(lambda: make_subspace("reflect", CFG, K, F, rngs=nnx.Rngs(7)))
    mod = create_sharded(lambda: make_subspace("reflect", CFG, K, F, reflections=2, rngs=nnx.Rngs(7)))
    _, _, _, _, (z, base, src, a) = _data(seed=3)
    mix = mix_sources(a, base, src)
    weights = jnp.asarray(np.random.default_rng(4).normal(size=base.shape), jnp.float32)
    gd, params, rest = nnx.split(mod, nnx.Param, ...)

    def loss(p):
        return jnp.sum(nnx.merge(gd, p, rest)(z, base, mix) * weights)

    grads = jax.jit(jax.grad(loss))(params)
    assert_gradients_reach(grads, ("rotate_layer", "rv_proj"))
    # Two equal reflections cancel (H H = I): the patch is the plain DAS patch with R.
    down = mod.rv_proj.down_proj.kernel[...]
    mod.rv_proj.down_proj.kernel[...] = jnp.concatenate([down[:, :D], down[:, :D]], axis=1)
    das = base + jnp.einsum("bjk,dk->bjd", jnp.einsum("bjd,dk->bjk", mix - base, _rotation(mod.rotate_layer)),
                            _rotation(mod.rotate_layer))
    np.testing.assert_allclose(np.asarray(_apply(mod, z, base, mix, TAU)), np.asarray(das), atol=1e-5)
    assert np.abs(np.asarray(_apply(one, z, base, mix, TAU)) - np.asarray(das)).max() > 1e-3
