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
