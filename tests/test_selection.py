"""Selection head against a naive numpy reference, hard inference modes, sparsity loss and its schedule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hyperdas_jax.config import ModelConfig
from hyperdas_jax.models.selection import SelectionHead, select, sparsity_loss, sparsity_weight
from hyperdas_jax.sharding import create_sharded

CFG = ModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0)
D, N, NK, H = 64, 4, 2, 16


# --------------------------------------------------------------------------------------------
# Frozen numpy reference of method notes §4.1, written the naive way (float64).


def _rope_np(x, pos, theta):
    """HF rotate-half RoPE: x (..., h), integer positions pos (...)."""
    h = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, h, 2) / h)
    freqs = pos[..., None].astype(np.float64) * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return x * np.cos(emb) + np.concatenate([-x2, x1], axis=-1) * np.sin(emb)


def reference_selection(wq, wk, wc, z, epos, base, bmask, src, smask, swap=False, theta=500000.0, breal=None,
                        rope=True):
    """A as the original computes it; `breal` (b, j), when given, is the real-token mask of the base
    and only real base tokens advance the SELF row's RoPE positions (our default); rope=False rotates
    neither query nor keys (intervention.pair_positions=none)."""
    b, tb, d = base.shape
    ts = src.shape[1]
    n, nk = wq.shape[1] // H, wk.shape[1] // H
    feats = np.zeros((b, ts + 1, tb, d))
    for i in range(ts):
        for j in range(tb):
            cat = np.concatenate([src[:, i], base[:, j]], -1) if swap else np.concatenate([base[:, j], src[:, i]], -1)
            feats[:, i, j] = cat @ wc  # C·[b_j; s_i] with C stored [in, out]
    feats[:, ts] = base  # SELF row: raw base vector
    mask = np.ones((b, ts + 1, tb))
    mask[:, :ts] = smask[:, :, None] * bmask[:, None, :]
    counted = mask.copy()
    if breal is not None:
        counted[:, ts] = breal
    flat = counted.reshape(b, -1)
    pos = (np.cumsum(flat, axis=1) * flat).astype(np.int64)  # (b, P)
    keys = (feats.reshape(b, -1, d) @ wk).reshape(b, -1, nk, H)
    q = (z @ wq).reshape(b, n, H)
    if rope:
        keys = _rope_np(keys, pos[:, :, None].repeat(nk, 2), theta)
        q = _rope_np(q, epos[:, None].repeat(n, 1), theta)
    scores = np.zeros((b, n, flat.shape[1]))
    for head in range(n):
        scores[:, head] = np.einsum("bh,bph->bp", q[:, head], keys[:, :, head // (n // nk)]) / np.sqrt(H)
    logits = scores.mean(1).reshape(b, ts + 1, tb)
    logits = np.where(mask > 0, logits, -np.inf)
    logits = logits - logits.max(1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def fresh_head():
    return create_sharded(lambda: SelectionHead(CFG, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def head_and_weights(fresh_head):
    head = nnx.clone(fresh_head)
    rng = np.random.default_rng(0)
    # Larger than the N(0, 0.02) init so the logits are O(1) and positions/masks visibly matter.
    w = {"q_proj": rng.normal(0, 0.3, (D, N * H)), "k_proj": rng.normal(0, 0.3, (D, NK * H)),
         "q_combine": rng.normal(0, 0.3, (2 * D, D))}
    for name, value in w.items():
        getattr(head, name).kernel[...] = jnp.asarray(value, jnp.float32)
    return head, w


def _inputs(seed=1, b=3, ts=4, tb=5):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    z = rng.normal(0, 1.0, (b, D))
    base = unit(rng.normal(size=(b, tb, D)))
    src = unit(rng.normal(size=(b, ts, D)))
    bmask = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])[:b, :tb]
    smask = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 1]])[:b, :ts]
    epos = np.array([7, 3, 12])[:b]
    return z, epos, base, bmask, src, smask


@functools.partial(nnx.jit, static_argnames="swap")
def _apply(head, z, epos, base, bmask, src, smask, swap=False):
    return head(z, epos, base, bmask, src, smask, swap=swap)


def _run(head, z, epos, base, bmask, src, smask, swap=False):
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    args = (f(z), jnp.asarray(epos), f(base), jnp.asarray(bmask), f(src), jnp.asarray(smask))
    if isinstance(swap, bool):
        return np.asarray(_apply(head, *args, swap=swap))
    return np.asarray(_apply_traced_swap(head, *args, swap))


@nnx.jit
def _apply_traced_swap(head, z, epos, base, bmask, src, smask, swap):
    return head(z, epos, base, bmask, src, smask, swap=swap)  # swap is a tracer here


@pytest.mark.parametrize("swap", [False, True])
def test_head_matches_naive_reference(head_and_weights, swap):
    head, w = head_and_weights
    z, epos, base, bmask, src, smask = _inputs()
    want = reference_selection(w["q_proj"], w["k_proj"], w["q_combine"], z, epos, base, bmask, src, smask, swap=swap)
    got = _run(head, z, epos, base, bmask, src, smask, swap=swap)
    assert got.shape == (3, 5, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert want[:, :-1].max() > 0.3  # the reference is far from uniform, so the comparison means something


def test_position_free_pairs_match_reference_and_ignore_positions(head_and_weights):
    """positions="none": content-only pair scores, equal to the reference without any rotation,
    unchanged by the editor position or by where the tokens sit, different from the RoPE scores."""
    head, w = head_and_weights
    z, epos, base, bmask, src, smask = _inputs()
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    apply = nnx.jit(lambda h, *a: h(*a, positions="none"))
    got = np.asarray(apply(head, f(z), jnp.asarray(epos), f(base), jnp.asarray(bmask), f(src), jnp.asarray(smask)))
    want = reference_selection(w["q_proj"], w["k_proj"], w["q_combine"], z, epos, base, bmask, src, smask, rope=False)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - _run(head, z, epos, base, bmask, src, smask)).max() > 1e-2
    # Another editor position and the base/source tokens moved one place left (a shifted template):
    # the same A on the moved tokens.
    moved = np.asarray(apply(head, f(z), jnp.asarray(epos + 5), f(np.roll(base, -1, 1)),
                             jnp.asarray(np.roll(bmask, -1, 1)), f(np.roll(src, -1, 1)), jnp.asarray(np.roll(smask, -1, 1))))
    np.testing.assert_allclose(moved[:, :-1], np.roll(np.roll(got[:, :-1], -1, 1), -1, 2), atol=1e-6)
    np.testing.assert_allclose(moved[:, -1], np.roll(got[:, -1], -1, 1), atol=1e-6)
    with pytest.raises(ValueError, match="positions must be 'rope' or 'none'"):
        head(f(z), jnp.asarray(epos), f(base), jnp.asarray(bmask), f(src), jnp.asarray(smask), positions="alibi")


def test_self_row_positions_on_a_padded_batch(head_and_weights):
    """Left padding: the original counts the pad columns' SELF entries into the SELF row's RoPE
    positions (base_attention_mask=None), our default only the real base tokens."""
    head, w = head_and_weights
    z, epos, base, bmask, src, smask = _inputs()
    breal = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # rows 0 and 2 are left-padded
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    args = (f(z), jnp.asarray(epos), f(base), jnp.asarray(bmask), f(src), jnp.asarray(smask))
    ours = np.asarray(nnx.jit(lambda h, m, *a: h(*a, base_attention_mask=m))(head, jnp.asarray(breal), *args))
    original = _run(head, z, epos, base, bmask, src, smask)
    want_ours = reference_selection(w["q_proj"], w["k_proj"], w["q_combine"], z, epos, base, bmask, src, smask,
                                    breal=breal)
    want_original = reference_selection(w["q_proj"], w["k_proj"], w["q_combine"], z, epos, base, bmask, src, smask)
    np.testing.assert_allclose(ours, want_ours, atol=1e-5)
    np.testing.assert_allclose(original, want_original, atol=1e-5)
    np.testing.assert_allclose(ours[1], original[1], atol=1e-6)  # no padding: the same A
    assert np.abs(ours[[0, 2]] - original[[0, 2]]).max() > 1e-3  # padding: the two rules differ


def test_swap_as_traced_flag(head_and_weights):
    head, _ = head_and_weights
    args = _inputs()
    np.testing.assert_allclose(_run(head, *args, swap=jnp.asarray(True)), _run(head, *args, swap=True), atol=1e-6)
    assert np.abs(_run(head, *args, swap=True) - _run(head, *args)).max() > 1e-3


def test_masking_is_exact(head_and_weights):
    head, _ = head_and_weights
    z, epos, base, bmask, src, smask = _inputs()
    a = _run(head, z, epos, base, bmask, src, smask)
    for b in range(3):
        for j in range(5):
            if not bmask[b, j]:
                assert a[b, -1, j] == 1.0 and np.all(a[b, :-1, j] == 0.0)
        for i in range(4):
            if not smask[b, i]:
                assert np.all(a[b, i] == 0.0)
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-6)


def test_all_pad_row_no_nan(head_and_weights):
    head, _ = head_and_weights
    z, epos, base, bmask, src, smask = _inputs()
    bmask, smask, z = bmask.copy(), smask.copy(), z.copy()
    bmask[1], smask[1], z[1], epos[1] = 0, 0, 0.0, 0
    a = _run(head, z, epos, base, bmask, src, smask)
    assert np.isfinite(a).all()
    assert np.all(a[1, -1] == 1.0) and np.all(a[1, :-1] == 0.0)

    gd, params, rest = nnx.split(head, nnx.Param, ...)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=a.shape), jnp.float32)

    def loss(p):
        out = nnx.merge(gd, p, rest)(jnp.asarray(z, jnp.float32), jnp.asarray(epos), jnp.asarray(base, jnp.float32),
                                     jnp.asarray(bmask), jnp.asarray(src, jnp.float32), jnp.asarray(smask))
        return jnp.sum(out * weights)

    grads = jax.jit(jax.grad(loss))(params)
    for leaf in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(leaf)).all() and np.abs(np.asarray(leaf)).max() > 0


def test_init_is_normal_002_float32(fresh_head):
    head = fresh_head
    for name, shape in [("q_proj", (D, N * H)), ("k_proj", (D, NK * H)), ("q_combine", (2 * D, D))]:
        kernel = np.asarray(getattr(head, name).kernel[...])
        assert kernel.shape == shape and kernel.dtype == np.float32
        assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
    assert not hasattr(head, "v_proj") and not hasattr(head, "o_proj")


# --------------------------------------------------------------------------------------------
# Hard selection on hand-built matrices (rows: source tokens, then SELF; columns: base tokens).

# s0 is the best source for base columns 0 and 1.
A1 = [[0.6, 0.5, 0.0],
      [0.1, 0.2, 0.3],
      [0.3, 0.3, 0.7]]
# Exact ties (binary fractions): s0 vs SELF in column 0, s1's row ties between columns 1 and 2.
A2 = [[0.5, 0.0, 0.25],
      [0.0, 0.0625, 0.0625],
      [0.0, 0.875, 0.125],
      [0.5, 0.0625, 0.5625]]
# s0's bid on column 0 (0.0625) only ties SELF there; the 0.1 floor makes SELF win.
A3 = [[0.0625, 0.0],
      [0.875, 0.9375],
      [0.0625, 0.0625]]


_select = jax.jit(select, static_argnames=("mode", "threshold"))


def _sel(a, mode, **kw):
    out = np.asarray(_select(jnp.asarray([a], jnp.float32), mode, **kw))[0]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.sum(0), 1.0)
    return out.tolist()


def test_soft_is_identity():
    assert _sel(A2, "soft") == A2
    assert _sel(A2, None) == A2


def test_column_argmax():
    assert _sel(A1, "column_argmax") == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]  # s0 wins two columns
    assert _sel(A2, "column_argmax") == [[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1]]  # tie: s0 beats SELF
    assert _sel(A3, "column_argmax") == [[0, 0], [1, 1], [0, 0]]


def test_bidding_argmax():
    assert _sel(A1, "bidding_argmax") == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]  # s0 wins only one column
    # s0 ties SELF in column 0 and wins; s1 bids on column 1 (the lower of its tied columns) and loses to s2.
    assert _sel(A2, "bidding_argmax") == [[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert _sel(A3, "bidding_argmax") == [[0, 0], [0, 1], [1, 0]]  # 0.0625 < 0.1 floor
    assert _sel(A3, "bidding_argmax", threshold=0.0) == [[1, 0], [0, 1], [0, 0]]  # no floor: exact tie, s0 wins


def test_global_argmax():
    assert _sel(A1, "global_argmax") == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert _sel(A2, "global_argmax") == [[0, 0, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1]]
    all_self = [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    assert _sel(all_self, "global_argmax") == all_self  # nothing to pick: no intervention


def test_masks_exclude_pairs_in_every_hard_mode():
    bm = jnp.asarray([[0, 1, 1]])
    assert _sel(A1, "column_argmax", base_mask=bm) == [[0, 1, 0], [0, 0, 0], [1, 0, 1]]
    assert _sel(A1, "bidding_argmax", base_mask=bm) == [[0, 1, 0], [0, 0, 0], [1, 0, 1]]  # s0 bids on column 1
    assert _sel(A1, "global_argmax", base_mask=bm) == [[0, 1, 0], [0, 0, 0], [1, 0, 1]]
    sm = jnp.asarray([[0, 1, 1]])
    assert _sel(A2, "global_argmax", source_mask=sm) == [[0, 0, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert _sel(A2, "column_argmax", source_mask=sm) == [[0, 0, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1]]
    # A masked source row as the head produces it (all zero) bids with weight 0 and never wins.
    a = [[0.0, 0.0], [0.75, 0.5], [0.25, 0.5]]
    assert _sel(a, "bidding_argmax") == [[0, 0], [1, 0], [0, 1]]


def test_groundtruth():
    a = jnp.full((3, 4, 3), 0.25, jnp.float32)  # ignored
    out = np.asarray(_select(a, "groundtruth", source_entity_pos=jnp.asarray([2, 0, -1]),
                            base_entity_pos=jnp.asarray([1, 2, 0])))
    assert out[0].tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert out[1].tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0], [1, 1, 0]]
    assert out[2].tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 1, 1]]  # entity not found: untouched
    with pytest.raises(ValueError):
        select(a, "groundtruth")
    with pytest.raises(ValueError):
        select(a, "row_argmax")


# --------------------------------------------------------------------------------------------
# Sparsity loss and schedule


def test_sparsity_loss_values():
    loss = jax.jit(sparsity_loss)
    a = jnp.asarray([
        [[0.5, 0.5, 0.25], [0.25, 0.5, 0.5], [0.25, 0.0, 0.25]],  # S = 1.25, 1.25 -> 2.5
        [[0.5, 0.25, 0.25], [0.25, 0.25, 0.25], [0.25, 0.5, 0.5]],  # S = 1.0 (not > 1), 0.75 -> 0
    ], jnp.float32)
    assert float(loss(a)) == pytest.approx(1.25)
    assert float(loss(a, valid=jnp.asarray([1, 0]))) == pytest.approx(2.5)
    assert float(loss(a, valid=jnp.asarray([0, 1]))) == 0.0
    assert float(loss(a, valid=jnp.asarray([0, 0]))) == 0.0
    assert float(loss(a[:1, [0, 2]])) == pytest.approx(1.25)  # one source row only


def _sparsity_log_reference(a, valid):
    """Σ_j −log(max(1 − m_j, 1e-12)) per example, m_j the column's mass in rows with S_i > 1; valid-weighted mean."""
    a = np.asarray(a, np.float64)
    out = []
    for ex in a:
        over = ex[:-1].sum(axis=1) > 1.0
        rest = ex[-1] + ex[:-1][~over].sum(axis=0)
        out.append(-np.log(np.maximum(rest, 1e-12)).sum())
    w = np.asarray(valid, np.float64)
    return (np.asarray(out) * w).sum() / w.sum()


def test_sparsity_loss_log_form_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 6, 5)) * 2.0
    logits[:, 0] += 2.5  # source row 0 takes most columns: S_0 > 1 in every example
    a = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=1)
    valid = np.asarray([1, 1, 0, 1])
    assert (np.asarray(a)[:, 0].sum(axis=-1) > 1).all()
    got = float(jax.jit(sparsity_loss, static_argnames="form")(a, jnp.asarray(valid), form="log"))
    assert got == pytest.approx(_sparsity_log_reference(a, valid), rel=1e-5)
    # A column given wholly to full rows hits the floor instead of an infinity.
    hand = jnp.asarray([[[0.5, 0.5, 0.25], [0.25, 0.5, 0.5], [0.25, 0.0, 0.25]]], jnp.float32)
    assert float(sparsity_loss(hand, form="log")) == pytest.approx(-2 * np.log(0.25) - np.log(1e-12), rel=1e-6)
    # No full row: 0, as "mass".
    even = jnp.full((2, 3, 2), 1 / 3, jnp.float32)
    assert float(sparsity_loss(even, form="log")) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="sparsity form"):
        sparsity_loss(even, form="entropy")


def test_sparsity_loss_log_form_matches_mass_to_first_order_and_does_not_saturate():
    # Small over-full mass: the two forms agree to O(m^2).
    a = np.full((1, 4, 8), 0.0, np.float32)
    a[0, 0] = 0.15  # S_0 = 1.2 > 1, m_j = 0.15 in every column
    a[0, 1:3] = 0.05
    a[0, 3] = 1 - a[0, :3].sum(axis=0)
    a = jnp.asarray(a)
    mass, log = float(sparsity_loss(a)), float(sparsity_loss(a, form="log"))
    assert mass == pytest.approx(1.2, rel=1e-6)
    assert log == pytest.approx(-8 * np.log(0.85), rel=1e-6)
    assert abs(log - mass) < 8 * 0.15 ** 2  # −log(1 − m) − m ≤ m² for m ≤ 1/2

    # Saturated: every column gives ~all its mass to one over-full source row. The logits' gradient of
    # "mass" vanishes with the rest of the column; "log"'s keeps A on that row.
    z = np.zeros((1, 4, 8), np.float32)
    z[0, 0] = 12.0
    z = jnp.asarray(z)
    g_mass = jax.grad(lambda z: sparsity_loss(jax.nn.softmax(z, axis=1)))(z)
    g_log = jax.grad(lambda z: sparsity_loss(jax.nn.softmax(z, axis=1), form="log"))(z)
    a = np.asarray(jax.nn.softmax(z, axis=1))
    assert np.abs(np.asarray(g_mass)).max() < 1e-4
    np.testing.assert_allclose(np.asarray(g_log)[0, 0], a[0, 0], rtol=1e-3)  # ≈ 1 per column
    np.testing.assert_allclose(np.asarray(g_log).sum(axis=1), 0.0, atol=1e-5)  # a softmax's logits: sums to 0


def test_sparsity_weight_schedule():
    lin = np.linspace(0.15, 1.5, 11)
    w = lambda s, **kw: float(sparsity_weight(s, 10, start=0.15, end=1.5, **kw))  # noqa: E731
    assert w(0, warmup_ratio=0.5) == 0.0 and w(4, warmup_ratio=0.5) == 0.0
    assert w(5, warmup_ratio=0.5) == pytest.approx(lin[5], abs=1e-6)  # jumps straight to 0.825
    assert w(5, warmup_ratio=0.5) == pytest.approx(0.825, abs=1e-6)
    assert w(10, warmup_ratio=0.5) == pytest.approx(1.5, abs=1e-7)
    assert w(0) == pytest.approx(0.15, abs=1e-7) and w(3) == pytest.approx(lin[3], abs=1e-6)
    assert w(7, warmup_ratio=0.7) == pytest.approx(lin[7], abs=1e-6)  # int(0.7 * 10) == 7
    assert w(6, warmup_ratio=0.7) == 0.0
    assert float(sparsity_weight(123, 10, start=0.25, end=9.0, warmup_ratio=0.5, schedule="constant")) == 0.25
    traced = jax.jit(lambda s: sparsity_weight(s, 10, start=0.15, end=1.5, warmup_ratio=0.5))
    assert [float(traced(jnp.asarray(s))) for s in (4, 5)] == [0.0, pytest.approx(0.825, abs=1e-6)]
    with pytest.raises(ValueError):
        sparsity_weight(0, 10, start=0.1, end=1.0, schedule="cosine")


def test_sparsity_weight_ramp_starts_after_the_warmup():
    # "ramp": 0 before step int(r*T), then linspace(start, end) over the remaining steps: no jump.
    ramp = lambda s: float(sparsity_weight(s, 10, start=0.15, end=1.5, warmup_ratio=0.4, schedule="ramp"))  # noqa: E731
    expected = [0.0] * 4 + list(np.linspace(0.15, 1.5, 7))
    assert [ramp(s) for s in range(11)] == pytest.approx(expected, abs=1e-6)
    assert ramp(25) == pytest.approx(1.5, abs=1e-7)  # held at `end` past the last step
    no_warmup = lambda s: float(sparsity_weight(s, 10, start=0.15, end=1.5, schedule="ramp"))  # noqa: E731
    assert [no_warmup(s) for s in range(11)] == pytest.approx(list(np.linspace(0.15, 1.5, 11)), abs=1e-6)
    traced = jax.jit(lambda s: sparsity_weight(s, 10, start=0.15, end=1.5, warmup_ratio=0.4, schedule="ramp"))
    assert [float(traced(jnp.asarray(s))) for s in (3, 4, 7)] == pytest.approx([0.0, 0.15, 0.825], abs=1e-6)


# --------------------------------------------------------------------------------------------
# Similarity prior on the selection logits


def reference_centred(x, mask, real):
    """Naive float64: each token minus the mean over its sequence's masked-in non-BOS tokens, unit length; masked 0."""
    out = np.zeros_like(x)
    for e in range(x.shape[0]):
        bos = np.flatnonzero(real[e])[0]
        keep = [t for t in range(x.shape[1]) if mask[e, t] and t != bos]
        mean = x[e, keep].mean(0) if keep else 0.0
        for t in range(x.shape[1]):
            if mask[e, t]:
                v = x[e, t] - mean
                out[e, t] = v / max(np.linalg.norm(v), 1e-6)
    return out


def reference_similarity(base, bmask, breal, src, smask, sreal):
    """Naive float64 centred cosine: mean over visible non-BOS tokens subtracted, masked tokens 0."""
    s, b = reference_centred(src, smask, sreal), reference_centred(base, bmask, breal)
    return np.einsum("eid,ejd->eij", s, b)


def test_similarity_prior_matches_reference():
    from hyperdas_jax.models.selection import similarity_prior

    rng = np.random.default_rng(5)
    _, _, _, bmask, _, smask = _inputs()
    base, src = rng.normal(size=(3, 5, D)) * 30, rng.normal(size=(3, 4, D)) * 30
    base[:, 0] += 500.0  # a BOS-like outlier where it is real: left out of the mean
    breal = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    sreal = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    want = reference_similarity(base, bmask, breal, src, smask, sreal)
    got = np.asarray(jax.jit(similarity_prior)(*(jnp.asarray(x, jnp.float32) if x.dtype.kind == "f" else jnp.asarray(x)
                                                 for x in (base, bmask, breal, src, smask, sreal))))
    assert got.shape == (3, 4, 5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(want).max() > 0.2 and (want == 0).any()  # informative and masked entries exist


def test_anchor_prior_matches_reference():
    """intervention.anchor_prior: cos(s_i, e_s) + cos(b_j, e_b), e the instruction's named-entity states."""
    from hyperdas_jax.models.selection import anchor_prior

    rng = np.random.default_rng(15)
    _, _, _, bmask, _, smask = _inputs()
    base, src, editor = (rng.normal(size=(3, n, D)) * 30 for n in (5, 4, 6))
    base[:, 0] += 500.0  # BOS-like outliers, left out of every mean
    editor[:, 0] += 500.0
    breal = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    sreal = np.array([[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    ereal = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    banchor, sanchor = np.array([3, 1, 2]), np.array([5, 3, 4])
    e = reference_centred(editor, ereal, ereal)
    rows = np.arange(3)
    want = (np.einsum("eid,ed->ei", reference_centred(src, smask, sreal), e[rows, sanchor])[:, :, None]
            + np.einsum("ejd,ed->ej", reference_centred(base, bmask, breal), e[rows, banchor])[:, None, :])
    args = [jnp.asarray(x, jnp.float32) if x.dtype.kind == "f" else jnp.asarray(x)
            for x in (base, bmask, breal, src, smask, sreal, editor, ereal, banchor, sanchor)]
    got = np.asarray(jax.jit(anchor_prior)(*args))
    assert got.shape == (3, 4, 5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The anchors matter: another anchor gives another prior.
    moved = np.asarray(jax.jit(anchor_prior)(*args[:8], jnp.asarray(sanchor), jnp.asarray(banchor)))
    assert np.abs(moved - got).max() > 0.1


def test_prior_adds_to_pair_logits_only(head_and_weights):
    head, _ = head_and_weights
    z, epos, base, bmask, src, smask = _inputs()
    prior = np.random.default_rng(6).normal(0, 2.0, (3, 4, 5))
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    args = (f(z), jnp.asarray(epos), f(base), jnp.asarray(bmask), f(src), jnp.asarray(smask))
    plain = np.asarray(nnx.jit(lambda h, *a: h(*a))(head, *args), np.float64)
    got = np.asarray(nnx.jit(lambda h, p, *a: h(*a, prior=p))(head, f(prior), *args))
    # softmax over rows of (log A + prior on the pair rows): the SELF row's logit is untouched.
    pair_mask = smask[:, :, None] * bmask[:, None, :] > 0
    logits = np.log(np.maximum(plain, 1e-300))
    logits[:, :-1] += np.where(pair_mask, prior, 0.0)
    logits = np.where(np.concatenate([pair_mask, np.ones((3, 1, 5), bool)], 1), logits, -np.inf)
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - plain).max() > 0.05
