"""HyperDAS subspaces (ReflectSelect, DAS, MaskSelect, BoundlessDAS, none) and the interchange intervention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.linalg import solve_triangular

from hyperdas_jax.config import ModelConfig
from hyperdas_jax.models.layers import MLP, Linear, RMSNorm, torch_linear_init
from hyperdas_jax.sharding import constrain

# Einsum letters beyond the legend in layers.py: i source token, j base token, k subspace
# coordinate (the rank, not kv heads, in this file).
#
# Optimiser groups are chosen by attribute name (method notes §7.3): everything under
# `rotate_layer` (the orthonormal R) gets lr 1e-3 and no weight decay; everything under
# `mask_projection` (the MaskSelect mask MLP, the BoundlessDAS boundary) gets lr 1e-2; the rest
# (ReflectSelect's `rv_norm`/`rv_proj`, MaskSelect's `mask_norm`) trains with the hypernetwork;
# `train.reflect_lr` (beyond the paper) gives `rv_norm`/`rv_proj` their own group.

_HIGHEST = jax.lax.Precision.HIGHEST  # R must stay orthonormal to float32 rounding; TF32 on GPU would not
# Activations are sharded over the batch only. ("batch", "seq", "embed") would map the "fsdp"
# mesh axis twice (batch -> (data, fsdp), embed -> fsdp), which JAX rejects on a real mesh.
_ACT_BJD = ("batch", "seq", None)
_SUBSPACE_EPS = 1e-5  # RMSNorm eps of the subspace modules (the original's rv norm)
KINDS = ("reflect", "das", "mask", "boundless", "none")


class Orthonormal(nnx.Module):
    """A D×k matrix R with orthonormal columns by construction, float32 whatever the model dtype.

    Parametrisation: the first k columns of a product of k Householder reflections
    H_1···H_k, H_i = I − 2 v_i v_iᵀ/‖v_i‖² with v_i = e_i + (strictly-lower part of column i of
    `reflectors`). This is the map of PyTorch's `orthogonal` parametrisation that the original
    uses for R, so Adam sees the same kind of free parameters. JAX's `householder_product` has
    no derivative rule, so the product is formed in the compact "UT" form
      H_1···H_k = I − V S⁻¹ Vᵀ,  S = ½·diag(VᵀV) + strict_upper(VᵀV)
    (Joffrain et al. 2006), i.e. two matmuls and one k×k triangular solve, all differentiable,
    parallel, and the same code for k = D. Unlike the original there is no fixed D×D base
    matrix B₀: the random start comes from random Householder vectors instead (tails of norm
    about 1, leading entry 1, so v never degenerates), which saves a D×D buffer and matmul.
    Entries on and above the diagonal of `reflectors` are unused and get zero gradient.
    """

    def __init__(self, dim: int, k: int, *, rngs: nnx.Rngs):
        if not 0 < k <= dim:
            raise ValueError(f"subspace rank must be in [1, {dim}], got {k}")
        noise = jax.random.normal(rngs.params(), (dim, k), jnp.float32)
        tail_len = jnp.maximum(dim - 1 - jnp.arange(k), 1).astype(jnp.float32)  # entries below the diagonal
        self.reflectors = nnx.Param(jnp.tril(noise, -1) / jnp.sqrt(tail_len), out_sharding=("embed", "subspace"))
        self.dim, self.k = dim, k

    def __call__(self) -> jax.Array:
        """R (d, k) float32 with RᵀR = I."""
        x = self.reflectors[...].astype(jnp.float32)
        eye = jnp.eye(self.dim, self.k, dtype=jnp.float32)
        v = jnp.tril(x, -1) + eye  # (d, k), column i is v_i
        gram = jnp.einsum("dk,dl->kl", v, v, precision=_HIGHEST)  # (k, k)
        s = jnp.triu(gram, 1) + 0.5 * jnp.diag(jnp.diag(gram))
        # First k columns of I − V S⁻¹ Vᵀ: Vᵀ E = V[:k]ᵀ.
        y = solve_triangular(s, v[: self.k].T, lower=False)  # (k, k)
        return eye - jnp.einsum("dk,kl->dl", v, y, precision=_HIGHEST)


class SwiGLU(nnx.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)) with its own output size (layers.MLP maps back to D)."""

    def __init__(self, din: int, hidden: int, dout: int, out_axis: str, *, param_dtype, dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs, init=torch_linear_init)
        self.gate_proj = Linear(din, hidden, ("embed", "mlp"), **kw)
        self.up_proj = Linear(din, hidden, ("embed", "mlp"), **kw)
        self.down_proj = Linear(hidden, dout, ("mlp", out_axis), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def _rotated_patch(base: jax.Array, source_mix: jax.Array, r: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """base + ((source_mix − base) R ⊙ weight) Rᵀ, computed in float32, returned in base's dtype.

    `weight` broadcasts against the (b, j, k) rotated coordinates (None: all ones, plain DAS).
    """
    delta = source_mix.astype(jnp.float32) - base.astype(jnp.float32)  # (b, j, d)
    coords = jnp.einsum("bjd,dk->bjk", delta, r, precision=_HIGHEST)
    if weight is not None:
        coords = coords * weight
    patch = jnp.einsum("bjk,dk->bjd", coords, r, precision=_HIGHEST)
    return constrain((base.astype(jnp.float32) + patch).astype(base.dtype), _ACT_BJD)


def _require_temperature(temperature, who: str):
    if temperature is None:
        raise ValueError(f"{who} needs a temperature (see `temperature(step, total_steps)`)")
    return jnp.asarray(temperature, jnp.float32)


class ReflectSelect(nnx.Module):
    """The paper's subspace: the static frame R reflected by instruction-dependent Householder vectors.

    u = g/‖g‖ with g = rv_proj(rv_norm(z)), W = (I − 2uuᵀ)R = R − 2u(uᵀR), and
    out = base + ((source − base) W) Wᵀ.

    With `reflections` = m > 1 (beyond the paper) rv_proj gives m vectors u_1..u_m and
    W = H_m···H_1 R. One reflection fixes every direction of span(R) orthogonal to u, so the
    subspaces of two concepts share at least k − 2 dimensions; with m reflections they share at
    least k − 2m. m = 1 is the original.
    """

    def __init__(self, cfg: ModelConfig, k: int, mlp_hidden: int, *, reflections: int = 1, rngs: nnx.Rngs):
        if reflections < 1:
            raise ValueError(f"reflections must be at least 1, got {reflections}")
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        d = cfg.hidden_size
        self.rotate_layer = Orthonormal(d, k, rngs=rngs)
        self.rv_norm = RMSNorm(d, _SUBSPACE_EPS, param_dtype=pd)
        if reflections == 1:  # PyTorch default init, as the original
            self.rv_proj = MLP(d, mlp_hidden, param_dtype=pd, dtype=dt, rngs=rngs)
        else:
            self.rv_proj = SwiGLU(d, mlp_hidden, reflections * d, "embed", param_dtype=pd, dtype=dt, rngs=rngs)
        self.reflections = reflections

    def reflection_vectors(self, z_last: jax.Array) -> jax.Array:
        """u (b, m, d) float32, each unit norm (0 where the MLP output is exactly 0: that H is I)."""
        g = self.rv_proj(self.rv_norm(z_last)).astype(jnp.float32)  # (b, m·d)
        g = g.reshape(g.shape[0], self.reflections, -1)  # (b, m, d)
        norm = jnp.sqrt(jnp.sum(g * g, axis=-1, keepdims=True))
        return g / jnp.where(norm > 0, norm, 1.0)  # the inner where keeps the gradient finite at g = 0

    def reflection_vector(self, z_last: jax.Array) -> jax.Array:
        """u (b, d) of the single-reflection module (the original's `save_vector`)."""
        if self.reflections != 1:
            raise ValueError(f"this ReflectSelect has {self.reflections} reflections; use reflection_vectors")
        return self.reflection_vectors(z_last)[:, 0]

    def basis(self, z_last: jax.Array) -> jax.Array:
        """W = H_m···H_1 R (b, d, k) float32 with orthonormal columns, for analysis; the forward never builds it."""
        u = self.reflection_vectors(z_last)  # (b, m, d)
        r = self.rotate_layer()  # (d, k)
        w = jnp.broadcast_to(r[None], (u.shape[0], *r.shape))
        for i in range(self.reflections):  # H_1 acts first
            uw = jnp.einsum("bd,bdk->bk", u[:, i], w, precision=_HIGHEST)
            w = w - 2.0 * u[:, i, :, None] * uw[:, None, :]
        return w

    def __call__(self, z_last: jax.Array, base: jax.Array, source_mix: jax.Array, *, temperature=None) -> jax.Array:
        """Patched base (b, j, d) in base's dtype.

        Args:
          z_last: (b, d) last editor token after the hypernetwork's final norm.
          base: (b, j, d) raw layer-L base states.
          source_mix: (b, j, d) `mix_sources(A, base, source)`.
          temperature: unused (accepted so every subspace has the same call).
        """
        del temperature
        r = self.rotate_layer()  # (d, k)
        u = self.reflection_vectors(z_last)  # (b, m, d)
        delta = source_mix.astype(jnp.float32) - base.astype(jnp.float32)  # (b, j, d)
        # The reflections are applied to the activations, never as a D×D or (b, d, k) matrix, so the
        # large contractions stay (b·j, d)×(d, k) matmuls shared over the batch. m = 1:
        #   Δ W  = Δ R − 2 (Δ·u) (uᵀR)      and      c Wᵀ = c Rᵀ − 2 (c·uᵀR) u.
        if self.reflections == 1:
            ur = jnp.einsum("bd,dk->bk", u[:, 0], r, precision=_HIGHEST)  # (b, k) = uᵀR
            du = jnp.einsum("bjd,bd->bj", delta, u[:, 0], precision=_HIGHEST)
            coords = jnp.einsum("bjd,dk->bjk", delta, r, precision=_HIGHEST) - 2.0 * du[..., None] * ur[:, None, :]
            cu = jnp.einsum("bjk,bk->bj", coords, ur, precision=_HIGHEST)
            patch = jnp.einsum("bjk,dk->bjd", coords, r, precision=_HIGHEST) - 2.0 * cu[..., None] * u[:, 0, None, :]
        else:
            # Δ W = ((Δ H_m)···H_1) R and c Wᵀ = ((c Rᵀ) H_1)···H_m, each H applied as x − 2 (x·u) u.
            x = delta
            for i in reversed(range(self.reflections)):
                x = x - 2.0 * jnp.einsum("bjd,bd->bj", x, u[:, i], precision=_HIGHEST)[..., None] * u[:, i, None, :]
            coords = jnp.einsum("bjd,dk->bjk", x, r, precision=_HIGHEST)
            patch = jnp.einsum("bjk,dk->bjd", coords, r, precision=_HIGHEST)
            for i in range(self.reflections):
                patch = patch - 2.0 * jnp.einsum("bjd,bd->bj", patch, u[:, i],
                                                 precision=_HIGHEST)[..., None] * u[:, i, None, :]
        return constrain((base.astype(jnp.float32) + patch).astype(base.dtype), _ACT_BJD)


class DAS(nnx.Module):
    """Static rank-k DAS: out = base + ((source − base) R) Rᵀ in float32; not instruction-conditioned."""

    def __init__(self, cfg: ModelConfig, k: int, *, rngs: nnx.Rngs):
        self.rotate_layer = Orthonormal(cfg.hidden_size, k, rngs=rngs)

    def __call__(self, z_last: jax.Array, base: jax.Array, source_mix: jax.Array, *, temperature=None) -> jax.Array:
        """Patched base (b, j, d); `z_last` and `temperature` are unused."""
        del z_last, temperature
        return _rotated_patch(base, source_mix, self.rotate_layer())


class MaskSelect(nnx.Module):
    """Static R plus a per-example soft mask over its k coordinates: m = sigmoid(mask_projection(mask_norm(z))/τ)."""

    def __init__(self, cfg: ModelConfig, k: int, mlp_hidden: int, *, rngs: nnx.Rngs):
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.rotate_layer = Orthonormal(cfg.hidden_size, k, rngs=rngs)
        self.mask_norm = RMSNorm(cfg.hidden_size, _SUBSPACE_EPS, param_dtype=pd)
        self.mask_projection = SwiGLU(cfg.hidden_size, mlp_hidden, k, "subspace", param_dtype=pd, dtype=dt,
                                      rngs=rngs)

    def mask(self, z_last: jax.Array, temperature) -> jax.Array:
        """m (b, k) float32 in (0, 1)."""
        tau = _require_temperature(temperature, "MaskSelect")
        logits = self.mask_projection(self.mask_norm(z_last)).astype(jnp.float32)  # (b, k)
        return jax.nn.sigmoid(logits / tau)

    def __call__(self, z_last: jax.Array, base: jax.Array, source_mix: jax.Array, *, temperature=None) -> jax.Array:
        """Patched base (b, j, d); `temperature` τ (scalar, may be traced) is required."""
        m = self.mask(z_last, temperature)
        return _rotated_patch(base, source_mix, self.rotate_layer(), m[:, None, :])


class BoundaryMask(nnx.Module):
    """Soft prefix mask over D rotated coordinates with a learned boundary: m_c = sigmoid((b·D − c)/τ).

    `boundary` is a fraction of D (init 0.5), so an lr of 1e-2 moves it by about 1% of the
    coordinates per step whatever D is. It is not clipped; the sigmoid saturates instead.
    """

    def __init__(self, dim: int, init: float = 0.5):
        self.boundary = nnx.Param(jnp.asarray(init, jnp.float32))
        self.dim = dim

    def __call__(self, temperature) -> jax.Array:
        """m (d,) float32."""
        tau = _require_temperature(temperature, "BoundlessDAS")
        coord = jnp.arange(self.dim, dtype=jnp.float32)
        return jax.nn.sigmoid((self.boundary[...] * self.dim - coord) / tau)


class BoundlessDAS(nnx.Module):
    """Full D×D rotation with a learned boundary: out = base + ((source − base) R ⊙ m) Rᵀ.

    The original class cannot be constructed (method notes §5.3); this one follows its
    description. The boundary sits under `mask_projection` so it trains with lr 1e-2 (the
    original's `boundary_lr`).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, boundary_init: float = 0.5):
        self.rotate_layer = Orthonormal(cfg.hidden_size, cfg.hidden_size, rngs=rngs)
        self.mask_projection = BoundaryMask(cfg.hidden_size, boundary_init)

    def __call__(self, z_last: jax.Array, base: jax.Array, source_mix: jax.Array, *, temperature=None) -> jax.Array:
        """Patched base (b, j, d); `temperature` τ is required, `z_last` unused."""
        del z_last
        return _rotated_patch(base, source_mix, self.rotate_layer(), self.mask_projection(temperature))


class NoSubspace(nnx.Module):
    """No subspace: the full-vector soft patch out_j = Σ_i A[i, j]·s_i + A[SELF, j]·b_j, i.e. source_mix."""

    def __call__(self, z_last: jax.Array, base: jax.Array, source_mix: jax.Array, *, temperature=None) -> jax.Array:
        del z_last, temperature
        return source_mix.astype(base.dtype)


def make_subspace(kind: str, cfg: ModelConfig, k: int, mlp_hidden: int, *, reflections: int = 1,
                  rngs: nnx.Rngs) -> nnx.Module:
    """Builds the subspace module named by `kind` (one of KINDS); `k`/`mlp_hidden`/`reflections` are ignored
    where unused.

    The original hard-codes mlp_hidden = 14336 (Llama-3-8B's intermediate size).
    """
    if kind == "reflect":
        return ReflectSelect(cfg, k, mlp_hidden, reflections=reflections, rngs=rngs)
    if kind == "das":
        return DAS(cfg, k, rngs=rngs)
    if kind == "mask":
        return MaskSelect(cfg, k, mlp_hidden, rngs=rngs)
    if kind == "boundless":
        return BoundlessDAS(cfg, rngs=rngs)
    if kind == "none":
        return NoSubspace()
    raise ValueError(f"unknown subspace kind {kind!r}; expected one of {KINDS}")


def mix_sources(a: jax.Array, base: jax.Array, source: jax.Array) -> jax.Array:
    """ŝ_j = Σ_i A[i, j]·s_i + A[SELF, j]·b_j (method notes §6).

    Args:
      a: (b, i+1, j) assignment, SELF row last.
      base: (b, j, d) raw layer-L base states.
      source: (b, i, d) raw layer-L source states.
    Returns:
      (b, j, d) in base's dtype, accumulated in float32; a column with A[SELF] = 1 gives b_j exactly.
    """
    ts = source.shape[1]
    a = a.astype(jnp.float32)
    mix = jnp.einsum("bij,bid->bjd", a[:, :ts], source.astype(jnp.float32), precision=_HIGHEST)
    mix = mix + a[:, ts, :, None] * base.astype(jnp.float32)
    return constrain(mix.astype(base.dtype), _ACT_BJD)


def temperature(step: int | jax.Array, total_steps: int, start: float = 50.0, end: float = 0.1) -> jax.Array:
    """Linear anneal linspace(start, end, total_steps + 1)[step] for MaskSelect/BoundlessDAS; `step` may be traced."""
    t = jnp.clip(jnp.asarray(step), 0, total_steps).astype(jnp.float32) / max(total_steps, 1)
    return (start * (1.0 - t) + end * t).astype(jnp.float32)
