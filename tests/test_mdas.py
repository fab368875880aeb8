"""MDAS baseline: the fixed-position DAS patch, checked against a hand-written patch on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperdas_fixtures import make_batch, tiny
from hyperdas_jax.mdas import MDASMethod, build_mdas, mdas_steps


def hand_patch(target, batch, layer, r=None):
    """Writes b + R Rᵀ (s - b) (or s itself when r is None) at the entity positions by hand."""
    hb = np.array(target.hidden_states(batch["base_ids"], batch["base_mask"])[layer])
    hs = np.asarray(target.hidden_states(batch["source_ids"], batch["source_mask"])[layer])
    rows = np.arange(len(hb))
    b = hb[rows, batch["base_entity_pos"]].astype(np.float64)
    s = hs[rows, batch["source_entity_pos"]].astype(np.float64)
    if r is None:
        new = s
    else:
        rr = np.asarray(r, np.float64)[batch["task_id"]]  # (b, d, k)
        new = b + np.einsum("bdk,bk->bd", rr, np.einsum("bdk,bd->bk", rr, s - b))
    hb[rows, batch["base_entity_pos"]] = new.astype(np.float32)
    h = target.run_layers(jnp.asarray(hb), target.attn_inputs(batch["base_mask"]), layer)
    return np.asarray(target.unembed(h))


@pytest.mark.parametrize("rank", [64, 8])
def test_mdas_equals_a_hand_written_fixed_position_patch(rank):
    cfg, target, _ = tiny([f"intervention.rank={rank}"])
    model = build_mdas(target, cfg, n_tasks=3)
    steps = mdas_steps(model, target, cfg)
    batch = make_batch(np.random.default_rng(0))
    batch["task_id"] = np.array([0, 2, 1, 2], np.int32)
    out = steps.evaluate(steps.params, batch, "soft")
    w = out["logits"].shape[1]
    r = None if rank == 64 else model.bases()  # rank = D: R Rᵀ = I, the source vector replaces the base's
    expected = hand_patch(target, batch, cfg.intervention.layer, r)[:, -w - 1:-1]
    np.testing.assert_allclose(np.asarray(out["logits"]), expected, atol=2e-5, rtol=0)


def test_mdas_trains_only_its_rotations_and_scores_through_the_method():
    cfg, target, _ = tiny(["intervention.rank=8", "train.rotate_lr=1e-2"])
    model = build_mdas(target, cfg, n_tasks=2)
    steps = mdas_steps(model, target, cfg)
    batch = make_batch(np.random.default_rng(1))
    batch["task_id"] = np.array([0, 1, 0, 1], np.int32)
    params = jax.tree.map(jnp.copy, steps.params)
    opt = steps.init_opt_state(params)
    losses = []
    for i in range(5):
        params, opt, m = steps.train(params, opt, batch, i, jax.random.key(0))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    method = MDASMethod(steps, params, {"A": 0, "B": 1}).with_rows(np.array([0, 1, 0, 1]))
    plain = {k: v for k, v in batch.items() if k != "task_id"}
    plain["row_index"] = np.arange(4, dtype=np.int32)
    got = method.eval_batch(plain, "bidding_argmax")["correct"]
    np.testing.assert_array_equal(got, np.asarray(steps.evaluate(params, batch, "soft")["correct"]))
    every = method.eval_modes(plain, ("soft", "column_argmax", "bidding_argmax"))  # one pass: modes do not apply
    assert list(every) == ["soft", "column_argmax", "bidding_argmax"]
    for out in every.values():
        np.testing.assert_array_equal(out["correct"], got)
        assert out["selection"] is None
    with pytest.raises(ValueError, match="run another forward"):  # forward_modes is HyperDAS's alone
        steps.evaluate_modes(params, batch, ("soft",))


def test_cached_layer_states_give_the_same_loss_gradients_and_logits():
    from hyperdas_jax.clean_states import CleanStateCache, make_cache
    from hyperdas_jax.data.collate import EncodedExample
    from hyperdas_jax.train import label_window, loss_fn

    cfg, target, _ = tiny(["intervention.rank=8"])
    model = build_mdas(target, cfg, n_tasks=2)
    steps = mdas_steps(model, target, cfg)
    layer = cfg.intervention.layer
    batch = make_batch(np.random.default_rng(2))
    batch["task_id"] = np.array([0, 1, 1, 0], np.int32)
    cache = CleanStateCache(steps.target_graphdef, steps.target_state, layer=layer)
    cached = cache.attach(batch)
    assert "base_states" not in cached and cached["base_layer_states"].shape == (*batch["base_ids"].shape, 64)
    real = batch["base_mask"] > 0
    hs = np.asarray(target.hidden_states(batch["base_ids"], batch["base_mask"])[layer])  # (b, t, d)
    np.testing.assert_allclose(cached["base_layer_states"][real], hs[real], atol=1e-5, rtol=0)
    assert (cached["base_layer_states"][~real] == 0).all()
    # A random rotation barely moves the loss: train a few steps so the gradients are not all tiny.
    params, opt = jax.tree.map(jnp.copy, steps.params), steps.init_opt_state(steps.params)
    for i in range(3):
        params, opt, _ = steps.train(params, opt, batch, i, jax.random.key(0))
    window = label_window(batch["labels"])
    ctx = steps.context("soft", window, training=True)
    grad = jax.jit(jax.grad(loss_fn, has_aux=True), static_argnames="ctx")
    g0, m0 = grad(params, steps.target_state, batch, 3, jax.random.key(0), ctx=ctx)
    g1, m1 = grad(params, steps.target_state, cached, 3, jax.random.key(0), ctx=ctx)
    assert float(m0["loss"]) > 0.1
    for key in ("loss", "pred_loss", "accuracy"):
        np.testing.assert_allclose(float(m1[key]), float(m0[key]), rtol=1e-5, atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max(), rtol=0, err_msg=jax.tree_util.keystr(path))
    plain, fast = steps.evaluate(params, batch), steps.evaluate(params, cached)
    np.testing.assert_allclose(np.asarray(fast["logits"]), np.asarray(plain["logits"]), atol=1e-4, rtol=0)
    # ...and the step reads the cached states rather than running the clean passes again.
    wrong = steps.evaluate(params, {**cached, "source_layer_states": cached["source_layer_states"] * 2})
    assert np.abs(np.asarray(wrong["logits"]) - np.asarray(plain["logits"])).max() > 1e-2
    # make_cache sizes a layer cache at one state per token.
    ex = [EncodedExample((1, 5), (1, 5, 6, 7), 3, 1, 1, (1, 8), 0, 1, True, 0)]
    made = make_cache(steps, ex, progress=False, layer=layer)
    assert made.layer == layer and made.nbytes == (4 + 2) * 64 * 4
    with pytest.raises(ValueError, match="layer must be in"):
        CleanStateCache(steps.target_graphdef, steps.target_state, layer=target.config.num_hidden_layers + 1)

