"""HyperDAS token-position selection: the pairwise selection head, hard inference modes, sparsity loss."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyperdas_jax.config import ModelConfig
from hyperdas_jax.models.layers import Linear, apply_rope, rope_inv_freq, rope_tables
from hyperdas_jax.sharding import constrain

# Einsum letters beyond the legend in layers.py: i source token, j base token (T_s, T_b),
# c the D-sized output of q_combine, r rotary frequency pair (h/2).

_MASK_VALUE = float(np.finfo(np.float32).min)  # finite: a masked entry's softmax weight is exactly 0, never NaN

MODES = ("soft", "column_argmax", "bidding_argmax", "global_argmax", "groundtruth")


def normal_init(std: float):
    """N(0, std) kernel init; HF `post_init` gives every fresh head Linear N(0, 0.02) (method notes §14.7)."""

    def init(key, shape, dtype):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


class SelectionHead(nnx.Module):
    """Scores every (source token, base token) pair, plus a SELF option per base token, against the last editor token.

    Params: `q_proj` [D, H·d_h], `k_proj` [D, H_kv·d_h] and `q_combine` [2D, D], all N(0, 0.02).
    Rows [:D] of `q_combine` multiply the base vector and rows [D:] the source vector (the
    original's C·[b; s]). The original's v_proj/o_proj are never used and are left out.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, nk, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype), rngs=rngs,
                  init=normal_init(0.02))
        self.q_proj = Linear(d, n * h, ("embed", "heads"), **kw)
        self.k_proj = Linear(d, nk * h, ("embed", "kv_heads"), **kw)
        # The output feeds k_proj, whose input axis is "embed"-sharded; the 2D input axis stays replicated.
        self.q_combine = Linear(2 * d, d, (None, "embed"), **kw)
        self.config = cfg
        self.num_heads, self.num_kv_heads, self.head_dim = n, nk, h
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, z_last: jax.Array, editor_pos_last: jax.Array, base_l: jax.Array, base_mask: jax.Array,
                 source_l: jax.Array, source_mask: jax.Array, *, swap: bool | jax.Array = False,
                 base_attention_mask: jax.Array | None = None, prior: jax.Array | None = None,
                 positions: str = "rope") -> jax.Array:
        """Soft assignment A of base positions to source positions or SELF (method notes §4.1).

        Args:
          z_last: (b, d) final-normed hypernetwork state of the last editor token.
          editor_pos_last: (b,) int RoPE position of that token (editor positions are cumsum(mask)·mask).
          base_l: (b, j, d) unit-L2-normalised layer-L base states.
          base_mask: (b, j) base intervention mask (int or bool).
          source_l: (b, i, d) unit-L2-normalised layer-L source states.
          source_mask: (b, i) source intervention mask.
          swap: the `break_asymmetric` coin: True concatenates [s_i; b_j] instead of [b_j; s_i].
            A Python bool or a traced scalar bool.
          base_attention_mask: (b, j) real-token mask of the base. When given, only real base tokens
            advance the SELF row's RoPE positions, so A does not depend on how much left padding a
            batch has. The original counts every SELF entry, pads included (the same thing when a
            batch has no padding, e.g. batch size 1); None reproduces that.
          prior: optional (b, i, j) float added to the pair logits (after the head-mean scaling);
            the SELF row gets none. See `similarity_prior`.
          positions: "rope" (the original): the query is rotated by its editor position and each
            pair's key by the pair's index in the flattened (i, j) grid. "none": no rotation at all,
            so a pair's logit depends on the two tokens' states only.
        Returns:
          A (b, i+1, j) float32, softmax over axis 1; row i (the last) is SELF. A masked base
          column has A[SELF] = 1 exactly, a masked source row is exactly 0. All inputs must be
          finite (pads included): a NaN in a masked entry would still poison the gradients.
        """
        b, tb, d = base_l.shape
        ts = source_l.shape[1]
        nk, h = self.num_kv_heads, self.head_dim
        g = self.num_heads // nk
        inv_freq = rope_inv_freq(self.config)  # (r,) float32
        base_l = base_l.astype(self.dtype)
        source_l = source_l.astype(self.dtype)

        # Query: the last editor token, with RoPE at its editor position unless positions == "none".
        q = self.q_proj(z_last.astype(self.dtype)).reshape(b, 1, self.num_heads, h)  # (b, 1, n, h)
        if positions == "rope":
            q_cos, q_sin = rope_tables(editor_pos_last.astype(jnp.int32)[:, None], inv_freq)  # (b, 1, h)
            q = apply_rope(q, q_cos, q_sin)
        elif positions != "none":
            raise ValueError(f"positions must be 'rope' or 'none', got {positions!r}")
        q = q.astype(jnp.float32).reshape(b, nk, g, h)
        # The mean over heads is taken before the softmax and the g query heads of a group share
        # one key, so mean_n <q_n, k_{n//g}> = <sum_g q_kg, k_k> / n: one summed query per kv head.
        q = q.sum(axis=2)  # (b, k, h)

        # Keys. q_combine and k_proj are bias-free linear maps, so for a pair (i, j)
        #   k_proj(C·[b_j; s_i]) = k_proj(C_b·b_j) + k_proj(C_s·s_i),
        # and each side is projected once per token instead of once per pair: the (b, i, j, 2D)
        # concatenation and the (b, i, j, D) pair features of the original are never built.
        c = self.q_combine.kernel[...].astype(self.dtype)  # (2d, c)
        c_base, c_src = c[:d], c[d:]
        if swap is not False:
            c_base, c_src = jnp.where(swap, c_src, c_base), jnp.where(swap, c_base, c_src)
        k_base = self.k_proj(jnp.einsum("bjd,dc->bjc", base_l, c_base)).reshape(b, tb, nk, h)  # (b, j, k, h)
        k_src = self.k_proj(jnp.einsum("bid,dc->bic", source_l, c_src)).reshape(b, ts, nk, h)  # (b, i, k, h)
        k_self = self.k_proj(base_l).reshape(b, tb, nk, h)  # (b, j, k, h): the SELF row is raw b_j, not through C

        # RoPE is applied per pair position, which differs for every (i, j), so the rotated key sum
        # would be a (b, i, j, k, h) tensor. Rotate-half RoPE acts on each frequency pair r (dims r
        # and r + h/2) as a 2-d rotation by angle p·θ_r, hence
        #   <q, rope_p(κ)> = Σ_r cos(p θ_r)·α_r(κ) + sin(p θ_r)·β_r(κ)
        # with α_r = q1·κ1 + q2·κ2 and β_r = q2·κ1 − q1·κ2 (1, 2 the two halves). α and β are linear
        # in κ, so they split into a base term and a source term; only the (b, i, j, r) angle
        # tables are pair-sized, 2·k times smaller than the rotated keys.
        alpha_b, beta_b = _rotary_terms(q, k_base)  # (b, j, r) each
        alpha_s, beta_s = _rotary_terms(q, k_src)  # (b, i, r)
        alpha_self, beta_self = _rotary_terms(q, k_self)  # (b, j, r)

        # Pair mask and RoPE positions cumsum(M)·M over the row-major flattened (i, j) axis, SELF row last.
        pair_mask = source_mask.astype(bool)[:, :, None] & base_mask.astype(bool)[:, None, :]  # (b, i, j)
        full_mask = jnp.concatenate([pair_mask, jnp.ones((b, 1, tb), bool)], axis=1)  # (b, i+1, j)
        counted = full_mask
        if base_attention_mask is not None:
            counted = jnp.concatenate([pair_mask, base_attention_mask.astype(bool)[:, None, :]], axis=1)
        flat = counted.reshape(b, (ts + 1) * tb).astype(jnp.int32)
        pos = (jnp.cumsum(flat, axis=1) * flat).reshape(b, ts + 1, tb)  # (b, i+1, j)
        if positions == "none":
            pos = jnp.zeros_like(pos)  # angle 0: <q, κ> = Σ_r α_r(κ)
        angle = pos.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (b, i+1, j, r)
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        cos_p, sin_p = cos[:, :ts], sin[:, :ts]  # (b, i, j, r)

        pair = (jnp.einsum("bijr,bjr->bij", cos_p, alpha_b) + jnp.einsum("bijr,bir->bij", cos_p, alpha_s)
                + jnp.einsum("bijr,bjr->bij", sin_p, beta_b) + jnp.einsum("bijr,bir->bij", sin_p, beta_s))
        own = jnp.einsum("bjr,bjr->bj", cos[:, ts], alpha_self) + jnp.einsum("bjr,bjr->bj", sin[:, ts], beta_self)
        logits = jnp.concatenate([pair, own[:, None, :]], axis=1) / (self.num_heads * math.sqrt(h))  # head mean
        if prior is not None:
            logits = logits + jnp.pad(prior.astype(jnp.float32), ((0, 0), (0, 1), (0, 0)))  # SELF row: + 0
        logits = jnp.where(full_mask, logits, _MASK_VALUE)  # (b, i+1, j)
        logits = constrain(logits, ("batch", "seq", "seq"))
        # The SELF row is never masked, so every column has a finite maximum and sums to 1.
        return jax.nn.softmax(logits, axis=1)


def _centred_units(x: jax.Array, mask: jax.Array, real: jax.Array) -> jax.Array:
    """(b, t, d) float32 unit vectors of x minus its mean over the `mask` tokens (BOS left out); masked -> 0.

    BOS is the first real token of each left-padded row (`real` (b, t) marks real tokens); its state is
    an outlier far larger than the rest, so it stays out of the mean.
    """
    x = x.astype(jnp.float32)
    keep = (mask > 0) & (jnp.cumsum(real > 0, axis=1) > 1)  # (b, t): in the mask and not BOS
    w = keep.astype(jnp.float32)[..., None]
    mean = jnp.sum(x * w, axis=1, keepdims=True) / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
    x = (x - mean) * (mask > 0).astype(jnp.float32)[..., None]
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def similarity_prior(base_l: jax.Array, base_mask: jax.Array, base_attention_mask: jax.Array,
                     source_l: jax.Array, source_mask: jax.Array, source_attention_mask: jax.Array) -> jax.Array:
    """Centred cosine similarity (b, i, j) of every source token's state with every base token's.

    Each prompt's mean state over its intervention-mask tokens, BOS left out (its state is an
    outlier far larger than the rest), is subtracted before the cosine; masked tokens get 0. The
    target's own states already say which base token matches a source token (at SmolLM2's hs[15]
    the base entity is among the 3 most similar base tokens to the source entity for ~94 % of RAVEL
    rows), so this is a parameter-free starting point for the selection logits.

    Args:
      base_l: (b, j, d) raw layer-L base states; base_mask (b, j) its intervention mask;
        base_attention_mask (b, j) its real-token mask (left padded: the first real token is BOS).
      source_l, source_mask, source_attention_mask: the same for the source, (b, i, d) and (b, i).
    Returns:
      (b, i, j) float32 in [-1, 1].
    """
    b_hat = _centred_units(base_l, base_mask, base_attention_mask)  # (b, j, d)
    s_hat = _centred_units(source_l, source_mask, source_attention_mask)  # (b, i, d)
    return jnp.einsum("bid,bjd->bij", s_hat, b_hat)


def anchor_prior(base_l: jax.Array, base_mask: jax.Array, base_attention_mask: jax.Array,
                 source_l: jax.Array, source_mask: jax.Array, source_attention_mask: jax.Array,
                 editor_l: jax.Array, editor_mask: jax.Array, base_anchor: jax.Array,
                 source_anchor: jax.Array) -> jax.Array:
    """cos(s_i, e_s) + cos(b_j, e_b) (b, i, j): how much each token looks like the entity the instruction names.

    e_b and e_s are the target's own states of the last token of the base and the source entity's
    name inside the concept description ("Vienna ; Paris - Country"), which the method reads at
    inference. Every state is centred on its own sequence's mean (BOS left out) as in
    `similarity_prior`, whose pair similarity cannot tell the base entity from a second city the
    template holds; the name in the instruction can. At SmolLM2's hs[15] the base entity's last token
    is the base token most like e_b for ~78 % of RAVEL city rows and the source entity's the source
    token most like e_s for ~99 %. Masked tokens get 0 from their side.

    Args:
      base_l, base_mask, base_attention_mask, source_l, source_mask, source_attention_mask: as in
        `similarity_prior`.
      editor_l: (b, e, d) the target's layer-L states of the instruction tokens; editor_mask (b, e)
        its real-token mask (left padded, BOS first).
      base_anchor, source_anchor: (b,) int positions in the instruction of the two names' last tokens.
    Returns:
      (b, i, j) float32 in [-2, 2].
    """
    e_hat = _centred_units(editor_l, editor_mask, editor_mask)  # (b, e, d)
    rows = jnp.arange(e_hat.shape[0])
    e_b, e_s = e_hat[rows, base_anchor], e_hat[rows, source_anchor]  # (b, d)
    b_hat = _centred_units(base_l, base_mask, base_attention_mask)  # (b, j, d)
    s_hat = _centred_units(source_l, source_mask, source_attention_mask)  # (b, i, d)
    to_base = jnp.einsum("bjd,bd->bj", b_hat, e_b)
    to_source = jnp.einsum("bid,bd->bi", s_hat, e_s)
    return to_source[:, :, None] + to_base[:, None, :]


def _rotary_terms(q: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """α, β (b, t, r) of `q` (b, k, h) against un-rotated `keys` (b, t, k, h), summed over kv heads."""
    keys = keys.astype(jnp.float32)
    q1, q2 = jnp.split(q, 2, axis=-1)  # (b, k, r)
    k1, k2 = jnp.split(keys, 2, axis=-1)  # (b, t, k, r)
    alpha = jnp.einsum("bkr,btkr->btr", q1, k1) + jnp.einsum("bkr,btkr->btr", q2, k2)
    beta = jnp.einsum("bkr,btkr->btr", q2, k1) - jnp.einsum("bkr,btkr->btr", q1, k2)
    return alpha, beta


# --------------------------------------------------------------------------------------------
# Hard selection at inference


def select(a: jax.Array, mode: str | None, *, base_entity_pos: jax.Array | None = None,
           source_entity_pos: jax.Array | None = None, threshold: float = 0.1,
           base_mask: jax.Array | None = None, source_mask: jax.Array | None = None) -> jax.Array:
    """Turns the soft assignment into the matrix used for the interchange (method notes §4.2).

    Ties in every argmax go to the lower index (row-major for global_argmax), as torch.argmax
    does, so a source row beats SELF on an exact tie.

    Masked pairs are never selected. A from `SelectionHead` has exactly 0 on masked pairs and
    every column sums to 1, which already keeps them out of column_argmax (the column maximum
    is > 0) and of bidding_argmax (a 0 bid loses to SELF ≥ threshold > 0). Passing the masks
    makes this hold for any A: masked pairs are then removed from every hard mode.
    Deliberate differences from the original, both only in degenerate cases:
      * bidding_argmax removes non-bid entries instead of zeroing them; the two agree whenever
        threshold > 0, and with threshold ≤ 0 the original could give a column to a source row
        that did not bid on it.
      * global_argmax intervenes only if the best pair has positive weight; the original would
        pick pair (0, 0) of an all-zero (e.g. fully masked) example.

    Args:
      a: (b, i+1, j) soft assignment, SELF row last.
      mode: one of MODES; None and "default" mean "soft".
      base_entity_pos: (b,) int, groundtruth only: base position to write into. A value
        outside [0, j) leaves the example untouched.
      source_entity_pos: (b,) int, groundtruth only: source position to read from.
      threshold: bidding_argmax floor applied to the SELF row (the original's 0.1).
      base_mask: optional (b, j) base intervention mask.
      source_mask: optional (b, i) source intervention mask.
    Returns:
      (b, i+1, j) float32; every column sums to 1 (one-hot in the hard modes).
    """
    if mode is None or mode == "default":
        mode = "soft"
    if mode not in MODES:
        raise ValueError(f"unknown selection mode {mode!r}; expected one of {MODES}")
    a = a.astype(jnp.float32)
    if mode == "soft":
        return a
    b, rows, tb = a.shape
    ts = rows - 1
    allowed = jnp.ones((b, ts, tb), bool)
    if source_mask is not None:
        allowed = allowed & source_mask.astype(bool)[:, :, None]
    if base_mask is not None:
        allowed = allowed & base_mask.astype(bool)[:, None, :]
    src, own = a[:, :ts], a[:, ts]  # (b, i, j), (b, j)

    if mode == "column_argmax":
        scores = jnp.concatenate([jnp.where(allowed, src, -1.0), own[:, None]], axis=1)
        return jax.nn.one_hot(jnp.argmax(scores, axis=1), rows, axis=1, dtype=jnp.float32)

    if mode == "bidding_argmax":
        # (a) each source row bids on its best allowed base column with its weight there.
        best_col = jnp.argmax(jnp.where(allowed, src, -jnp.inf), axis=2)  # (b, i)
        bids = jax.nn.one_hot(best_col, tb, dtype=bool) & allowed  # (b, i, j); no bid from an all-masked row
        # (b) SELF entries are floored at the threshold; (c) per column argmax, ties to the lower row.
        scores = jnp.concatenate([jnp.where(bids, src, -1.0), jnp.maximum(own, threshold)[:, None]], axis=1)
        return jax.nn.one_hot(jnp.argmax(scores, axis=1), rows, axis=1, dtype=jnp.float32)

    if mode == "global_argmax":
        flat = jnp.where(allowed, src, -1.0).reshape(b, ts * tb)
        best = jnp.argmax(flat, axis=1)  # (b,)
        hit = jnp.take_along_axis(flat, best[:, None], axis=1) > 0  # (b, 1)
        chosen = (jax.nn.one_hot(best, ts * tb, dtype=jnp.float32) * hit).reshape(b, ts, tb)
        return _with_self_row(chosen)

    # groundtruth: one pair per example, known from the entity positions; A is ignored.
    if base_entity_pos is None or source_entity_pos is None:
        raise ValueError("groundtruth mode needs base_entity_pos and source_entity_pos")
    chosen = (jax.nn.one_hot(source_entity_pos, ts, dtype=jnp.float32)[:, :, None]
              * jax.nn.one_hot(base_entity_pos, tb, dtype=jnp.float32)[:, None, :])  # (b, i, j); out of range -> 0
    return _with_self_row(jnp.where(allowed, chosen, 0.0))


def _with_self_row(chosen: jax.Array) -> jax.Array:
    """Appends the SELF row that completes every column of a 0/1 (b, i, j) pair matrix to sum 1."""
    return jnp.concatenate([chosen, 1.0 - chosen.sum(axis=1, keepdims=True)], axis=1)


# --------------------------------------------------------------------------------------------
# Source-selection sparsity loss and its schedule


def sparsity_loss(a: jax.Array, valid: jax.Array | None = None, form: str = "mass") -> jax.Array:
    """Mean over examples of the source-selection penalty (method notes §4.3).

    With S_i = Σ_j A[i, j] over source rows and P = {i : S_i > 1}:
    "mass" (the original): Σ_{i∈P} S_i. The penalty is S_i itself, not S_i − 1, as in the original: it
    jumps from 0 to above 1.
    "log" (an addition): Σ_j −log(1 − m_j), m_j = Σ_{i∈P} A[i, j] the mass base column j gives to P,
    1 − m_j summed from the rest of the column (SELF included). Σ_j m_j = Σ_{i∈P} S_i, so it equals
    "mass" to first order in m_j; but where "mass"'s gradient on a column's logits, A[k, j]·(1[k∈P] − m_j),
    vanishes as m_j → 1 (every column given to over-full rows), "log"'s is A[k, j]·(1[k∈P] − m_j)/(1 − m_j),
    A[k, j] on P's rows. 1 − m_j is floored at 1e-12.

    Args:
      a: (b, i+1, j) assignment, SELF row last (excluded from P).
      valid: optional (b,) weights; padded batch rows get 0 and do not count in the mean.
      form: "mass" or "log".
    Returns:
      Scalar float32 (0 when no example is valid).
    """
    a = a.astype(jnp.float32)
    mass = a[:, :-1, :].sum(axis=-1)  # (b, i)
    over = mass > 1.0  # (b, i): P, a constant of the gradient as the original's indicator
    if form == "mass":
        per_example = jnp.where(over, mass, 0.0).sum(axis=-1)  # (b,)
    elif form == "log":
        keep = jnp.concatenate([~over, jnp.ones_like(over[:, :1])], axis=1)  # (b, i+1): outside P, SELF last
        rest = jnp.einsum("bij,bi->bj", a, keep.astype(jnp.float32))  # (b, j): 1 − m_j
        per_example = -jnp.log(jnp.maximum(rest, 1e-12)).sum(axis=-1)  # (b,)
    else:
        raise ValueError(f"unknown sparsity form {form!r}; expected 'mass' or 'log'")
    if valid is None:
        return per_example.mean()
    w = valid.astype(jnp.float32)
    total = w.sum()
    return jnp.where(total > 0, (per_example * w).sum() / jnp.where(total > 0, total, 1.0), 0.0)


def sparsity_weight(step: int | jax.Array, total_steps: int, *, start: float, end: float,
                    warmup_ratio: float = 0.0, schedule: str = "linear") -> jax.Array:
    """Sparsity-loss weight λ at `step`; `step` may be traced, the rest are static config values.

    With w = int(warmup_ratio·total_steps) (Python's truncation, as the original):
    "linear": linspace(start, end, total_steps + 1)[step], forced to 0 for step < w; the ramp is
    not restarted after the warm-up, so the weight jumps to the linspace value there (as in the
    original). "ramp": 0 for step < w, then linear from `start` at step w to `end` at
    `total_steps` (no jump; an addition, not in the original). "constant": `start` at every step
    (the setting of the paper's main-table runs, 0.25).

    Returns:
      Scalar float32.
    """
    if schedule == "constant":
        return jnp.asarray(start, jnp.float32)
    if schedule not in ("linear", "ramp"):
        raise ValueError(f"unknown sparsity schedule {schedule!r}; expected 'linear', 'ramp' or 'constant'")
    warmup = int(warmup_ratio * total_steps)
    step = jnp.asarray(step)
    begin = warmup if schedule == "ramp" else 0
    t = jnp.clip(step - begin, 0, total_steps - begin).astype(jnp.float32) / max(total_steps - begin, 1)
    weight = start * (1.0 - t) + end * t  # exact at both ends
    return jnp.where(step < warmup, 0.0, weight).astype(jnp.float32)
