"""HyperDAS end to end on a tiny random target: identities, masking, padding, gradient isolation, learning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hyperdas_fixtures import assert_same_step, left_pad, make_batch, tiny
from hyperdas_jax.config import ConfigError
from hyperdas_jax.models.hypernet import HyperNetwork, make_memory
from hyperdas_jax.sharding import create_sharded
from hyperdas_jax.train import StepContext, Steps, label_window, loss_fn, spec_from_config


@pytest.fixture(scope="module")
def setup():
    cfg, target, model = tiny()
    return cfg, target, Steps(model, target, cfg)


def test_self_everywhere_leaves_target_unchanged(setup):
    _, target, steps = setup
    batch = make_batch(np.random.default_rng(0))
    batch["base_intervention_mask"][:] = 0  # no base position may be patched => A[SELF] = 1 exactly
    out = steps.evaluate(steps.params, batch, "soft")
    sel = np.asarray(out["selection"])
    np.testing.assert_array_equal(sel[:, -1], 1.0)
    np.testing.assert_array_equal(sel[:, :-1], 0.0)
    clean = np.asarray(target(batch["base_ids"], batch["base_mask"]))  # the plain forward (default positions)
    w = out["logits"].shape[1]
    np.testing.assert_allclose(np.asarray(out["logits"]), clean[:, -w - 1:-1], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(steps.baseline(batch)["correct"]), np.asarray(out["correct"]))


def test_masks_and_padding_in_the_selection(setup):
    _, _, steps = setup
    batch = make_batch(np.random.default_rng(1))
    sel = np.asarray(steps.evaluate(steps.params, batch, "soft")["selection"])  # (b, ts+1, tb)
    assert np.isfinite(sel).all()
    np.testing.assert_allclose(sel.sum(axis=1), 1.0, atol=1e-6)
    hidden_base = batch["base_intervention_mask"] == 0
    np.testing.assert_array_equal(sel[:, -1][hidden_base], 1.0)  # outside the base mask: SELF exactly
    hidden_src = batch["source_intervention_mask"] == 0
    assert (sel[:, :-1].transpose(0, 2, 1)[np.broadcast_to(hidden_src[:, None], (4, 16, 14))] == 0).all()


def test_left_padded_batch_equals_each_example_alone(setup):
    _, _, steps = setup
    lengths = [(4, 3, 2, 2, 5, 2), (10, 6, 3, 1, 7, 4), (6, 4, 1, 3, 3, 1), (8, 5, 2, 2, 4, 3)]
    batch = make_batch(np.random.default_rng(2), lengths=lengths)
    together = steps.evaluate(steps.params, batch, "soft")
    for i in range(4):
        alone = steps.evaluate(steps.params, {k: v[i:i + 1] for k, v in batch.items()}, "soft")
        w = min(together["logits"].shape[1], alone["logits"].shape[1])  # both windows end at the last token
        lab = batch["labels"][i, -w:] != -100
        np.testing.assert_allclose(np.asarray(together["logits"])[i, -w:][lab], np.asarray(alone["logits"])[0, -w:][lab],
                                   atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(together["selection"])[i], np.asarray(alone["selection"])[0],
                                   atol=1e-6, rtol=0)
    # The same rows with less left padding (narrower arrays) give the same A on the real positions.
    narrow = make_batch(np.random.default_rng(2), lengths=lengths, te=10, tb=13, ts=12)
    np.testing.assert_array_equal(narrow["base_ids"], batch["base_ids"][:, 3:])
    wide = np.asarray(together["selection"])  # (4, 14+1, 16)
    small = np.asarray(steps.evaluate(steps.params, narrow, "soft")["selection"])  # (4, 12+1, 13)
    np.testing.assert_allclose(wide[:, 2:14, 3:], small[:, :12], atol=1e-6, rtol=0)  # source rows
    np.testing.assert_allclose(wide[:, 14, 3:], small[:, 12], atol=1e-6, rtol=0)  # SELF row
    np.testing.assert_array_equal(wide[:, 14, :3], 1.0)  # pad columns are never patched


def test_original_self_positions_switch_makes_a_depend_on_padding():
    """intervention.self_positions=original reaches the head: the SELF row then moves with the left
    padding (the default's does not, see the test above)."""
    cfg, target, model = tiny(["intervention.self_positions=original"])
    steps = Steps(model, target, cfg)
    lengths = [(4, 3, 2, 2, 5, 2), (10, 6, 3, 1, 7, 4), (6, 4, 1, 3, 3, 1), (8, 5, 2, 2, 4, 3)]
    wide = np.asarray(steps.evaluate(steps.params, make_batch(np.random.default_rng(2), lengths=lengths),
                                     "soft")["selection"])
    narrow = make_batch(np.random.default_rng(2), lengths=lengths, te=10, tb=13, ts=12)
    small = np.asarray(steps.evaluate(steps.params, narrow, "soft")["selection"])
    np.testing.assert_array_equal(wide[:, 14, :3], 1.0)
    assert np.abs(wide[:, 14, 3:] - small[:, 12]).max() > 1e-4


def test_groundtruth_full_rank_equals_hand_patch():
    cfg, target, model = tiny(["intervention.rank=64"])
    steps = Steps(model, target, cfg)
    batch = make_batch(np.random.default_rng(3))
    out = steps.evaluate(steps.params, batch, "groundtruth")
    L = cfg.intervention.layer
    hs_b = target.hidden_states(batch["base_ids"], batch["base_mask"])
    hs_s = target.hidden_states(batch["source_ids"], batch["source_mask"])
    h = np.array(hs_b[L])
    rows = np.arange(4)
    h[rows, batch["base_entity_pos"]] = np.asarray(hs_s[L])[rows, batch["source_entity_pos"]]
    h = target.run_layers(jnp.asarray(h), target.attn_inputs(batch["base_mask"]), L)
    w = out["logits"].shape[1]
    expected = np.asarray(target.unembed(h))[:, -w - 1:-1]
    np.testing.assert_allclose(np.asarray(out["logits"]), expected, atol=1e-4, rtol=0)
    sel = np.asarray(out["selection"])
    assert (sel.sum(axis=(1, 2)) == 16).all() and (sel[:, :-1].sum(axis=(1, 2)) == 1).all()


def test_gradients_reach_the_hypernetwork_never_the_target(setup):
    cfg, target, steps = setup
    batch = make_batch(np.random.default_rng(4))
    ctx = StepContext(steps.graphdef, steps.target_graphdef, spec_from_config(cfg, window=label_window(batch["labels"])),
                      cfg.train)
    args = (steps.params, steps.target_state, batch, jnp.asarray(0), jax.random.key(0))
    g_params, g_target = jax.grad(lambda p, t, *a: loss_fn(p, t, *a, ctx)[0], argnums=(0, 1))(*args)
    norms = {k: float(optax_norm(v)) for k, v in nnx.to_pure_dict(g_params).items()}
    assert norms["hypernet"] > 0 and norms["head"] > 0 and norms["subspace"] > 0
    assert float(optax_norm(nnx.to_pure_dict(g_params)["subspace"]["rotate_layer"])) > 0
    # The clean passes are stop-gradient: the target's blocks below L get exactly zero even when asked for.
    layers = nnx.to_pure_dict(g_target)["layers"]
    for i in range(cfg.intervention.layer):
        assert float(optax_norm(layers[i])) == 0.0, i
    # The jitted train step updates the HyperDAS state and leaves the target bit for bit.
    before = jax.tree.map(np.array, steps.target_state)
    params = jax.tree.map(jnp.copy, steps.params)
    opt = steps.init_opt_state(params)
    new, _, metrics = steps.train(params, opt, batch, 0, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, steps.target_state))
    changed = jax.tree.map(lambda a, b: bool((np.asarray(a) != np.asarray(b)).any()), new, steps.params)
    assert all(jax.tree.leaves(changed))


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_original_self_attention_is_bidirectional_without_padding():
    cfg, target, _ = tiny()
    rng = np.random.default_rng(5)
    hs = target.hidden_states(*left_pad([rng.integers(3, 97, 6)] * 2, 6))
    mem = make_memory(hs, np.ones((2, 6), np.int32), target.config)
    ids = rng.integers(3, 97, (2, 5)).astype(np.int32)
    changed = ids.copy()
    changed[:, -1] = (changed[:, -1] + 1) % 97
    full = np.ones((2, 5), np.int32)
    for mode, expect_change in (("causal", False), ("original", True)):
        hyper = dataclasses.replace(cfg.hypernet, self_attention=mode)
        net = create_sharded(lambda: HyperNetwork(target.config, hyper, rngs=nnx.Rngs(0)))
        z1, _ = net(ids, full, mem, mem)
        z2, _ = net(changed, full, mem, mem)
        moved = float(jnp.abs(z1[:, 0] - z2[:, 0]).max())
        assert (moved > 1e-6) == expect_change, (mode, moved)
        # With a padded row in the batch, the original behaviour falls back to causal.
        pad = full.copy()
        pad[1, 0] = 0
        z1, _ = net(ids, pad, mem, mem)
        z2, _ = net(changed, pad, mem, mem)
        assert float(jnp.abs(z1[0, 0] - z2[0, 0]).max()) < 1e-6


def test_ablating_cross_attention_streams():
    cfg, target, model = tiny(["hypernet.source_cross_attention=false", "hypernet.base_cross_attention=false"])
    assert not hasattr(model.hypernet.layers[0], "source_cross_attn")
    assert not hasattr(model.hypernet.layers[0], "base_cross_attn")
    # Initialised from the target: self-attention copied, cross-attention (when present) too.
    cfg2, target2, model2 = tiny()
    blk, src = model2.hypernet.layers[1], target2.layers[1]
    np.testing.assert_array_equal(np.asarray(blk.base_cross_attn.q_proj.kernel[...]),
                                  np.asarray(src.self_attn.q_proj.kernel[...]))
    np.testing.assert_array_equal(np.asarray(blk.source_cross_attn_layernorm.weight[...]),
                                  np.asarray(src.input_layernorm.weight[...]))
    blk.base_cross_attn.q_proj.kernel[...] += 1.0  # independent copies, not aliases
    assert not np.array_equal(np.asarray(blk.self_attn.q_proj.kernel[...]),
                              np.asarray(blk.base_cross_attn.q_proj.kernel[...]))


def synthetic_task(target, rng, n):
    """Rows whose answer is the target's own prediction after the entity is swapped for the source's."""
    rows = []
    while len(rows) < n:
        prefix, e_b, e_s = rng.integers(3, 97, rng.integers(3, 6)), *rng.integers(3, 97, 2)
        base_prompt = np.concatenate([[1], prefix, [e_b]])
        cf = np.concatenate([[1], prefix, [e_s]])
        clean_next = int(np.asarray(target(base_prompt[None]))[0, -1].argmax())
        answer = int(np.asarray(target(cf[None]))[0, -1].argmax())
        if answer != clean_next:  # the intervention must change the output
            rows.append((base_prompt, cf, answer))
    return rows


def synthetic_batch(rows):
    b = {}
    b["editor_ids"], b["editor_mask"] = left_pad([np.array([1, r[0][-1], 2, r[1][-1]]) for r in rows], 8)
    base = [np.concatenate([r[0], [r[2]]]) for r in rows]
    b["base_ids"], b["base_mask"] = left_pad(base, 10)
    b["source_ids"], b["source_mask"] = left_pad([r[1] for r in rows], 8)
    b["base_intervention_mask"] = left_pad([np.r_[np.ones(len(x) - 1), 0] for x in base], 10)[0]
    b["source_intervention_mask"] = b["source_mask"].copy()
    b["labels"] = left_pad([np.r_[np.full(len(x) - 1, -100), x[-1]] for x in base], 10, -100)[0]
    b["base_entity_pos"] = np.full(len(rows), 8, np.int32)
    b["source_entity_pos"] = np.full(len(rows), 7, np.int32)
    b["is_causal"], b["valid"] = np.ones(len(rows), bool), np.ones(len(rows), bool)
    return b


@pytest.mark.slow
def test_loss_halves_on_a_synthetic_interchange_task():
    cfg, target, model = tiny(["target.random.tie_word_embeddings=true", "intervention.layer=1",
                               "intervention.rank=64", "train.causal_loss_weight=1.0", "train.lr=1e-3",
                               "train.sparsity.enabled=false", "train.steps=200"])
    rows = synthetic_task(target, np.random.default_rng(0), 16)
    batches = [synthetic_batch(rows[:8]), synthetic_batch(rows[8:])]
    steps = Steps(model, target, cfg)
    assert not np.asarray(steps.baseline(batches[0])["correct"]).any()  # doing nothing fails every row
    assert np.asarray(steps.evaluate(steps.params, batches[0], "groundtruth")["correct"]).all()  # solvable
    params, opt = steps.params, steps.init_opt_state(steps.params)
    losses = []
    for i in range(200):
        params, opt, m = steps.train(params, opt, batches[i % 2], i, jax.random.key(0))
        losses.append(float(m["loss"]))
    assert np.mean(losses[-10:]) <= 0.5 * np.mean(losses[:2]), (losses[:2], losses[-10:])
    assert np.asarray(steps.evaluate(params, batches[1], "soft")["correct"]).mean() >= 0.75


@pytest.mark.parametrize("option, group, prefixes, extra", [
    ("head_lr", "head", ("['head']",), ()),
    ("reflect_lr", "reflect", ("['subspace']['rv_norm']", "['subspace']['rv_proj']"), ("intervention.reflections=3",)),
])
def test_group_lr_moves_only_its_group(option, group, prefixes, extra):
    """train.head_lr / train.reflect_lr are one group's own Adam learning rate; every other group is unchanged."""
    from hyperdas_jax.train import param_group

    batch = make_batch(np.random.default_rng(7))
    results = {}
    for lr in (None, 1e-2):
        cfg, target, model = tiny([f"train.{option}={'null' if lr is None else lr}", *extra])
        steps = Steps(model, target, cfg)
        before = jax.tree.map(np.asarray, steps.params)
        params, _, _ = steps.train(steps.params, steps.init_opt_state(steps.params), batch, 0, jax.random.key(0))
        results[lr] = (before, jax.tree.map(np.asarray, params), cfg)
    cfg = results[1e-2][2]
    groups = {jax.tree_util.keystr(p): param_group(p, cfg.train)
              for p, _ in jax.tree_util.tree_leaves_with_path(results[None][0])}
    assert {k for k, g in groups.items() if g == group} == {k for k in groups if k.startswith(prefixes)} != set()
    # unset, the group does not exist: the optimizer state keeps the original's structure
    assert all(param_group(p, results[None][2].train) != "reflect"
               for p, _ in jax.tree_util.tree_leaves_with_path(results[None][0]))
    for (path, b0), a0, a1 in zip(jax.tree_util.tree_leaves_with_path(results[None][0]),
                                  jax.tree.leaves(results[None][1]), jax.tree.leaves(results[1e-2][1])):
        step0, step1 = np.abs(a0 - b0).max(), np.abs(a1 - b0).max()
        if groups[jax.tree_util.keystr(path)] == group:
            assert step1 > 5 * step0 > 0, jax.tree_util.keystr(path)  # Adam's first step is ~lr per weight (tiny: lr 1e-3)
        else:
            np.testing.assert_array_equal(a1, a0)


@pytest.mark.parametrize("ratio, scales", [
    (0.3, [1, 1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3]),  # 10 steps: constant for 7, then linearly towards 0
    (1.0, [1 - t / 10 for t in range(10)]),
])
def test_lr_decay_scales_every_group_over_the_last_steps(ratio, scales):
    """train.lr_decay_ratio: update t of every group (weight decay included) is the constant-lr update times scales[t]."""
    from hyperdas_jax.config import TrainConfig
    from hyperdas_jax.train import make_optimizer

    rng = np.random.default_rng(3)
    params = jax.tree.map(np.float32, {"head": {"w": rng.normal(size=3)}, "body": {"rotate_layer": rng.normal(size=2)},
                                      "x": rng.normal(size=4)})
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    const, decayed = (make_optimizer(TrainConfig(steps=10, head_lr=1e-2, lr_decay_ratio=r)) for r in (0.0, ratio))
    s0, s1 = const.init(params), decayed.init(params)
    for t in range(10):  # the same params each time: only the schedule separates the two updates
        u0, s0 = const.update(grads, s0, params)
        u1, s1 = decayed.update(grads, s1, params)
        for a, b in zip(jax.tree.leaves(u0), jax.tree.leaves(u1)):
            assert np.abs(a).min() > 0
            np.testing.assert_allclose(b, scales[t] * a, rtol=1e-6, atol=1e-12)
    # off: the optimizer state keeps the original's structure (older checkpoints resume)
    assert len(const.init(params)) == 2 and len(s1) == 3


def test_pair_positions_switch_reaches_the_head(setup):
    """intervention.pair_positions=none: the same weights give another A, still a column softmax with
    exact masks; a bad value is a config error."""
    cfg, target, steps = setup
    batch = make_batch(np.random.default_rng(8))
    model = steps.model(steps.params)
    for name in ("q_proj", "k_proj", "q_combine"):  # past the N(0, 0.02) init, so the logits are O(1)
        kernel = getattr(model.head, name).kernel
        kernel[...] = kernel[...] * 15.0
    rope = Steps(model, target, cfg)
    rope = np.asarray(rope.evaluate(rope.params, batch, "soft")["selection"])
    free = Steps(model, target, tiny(["intervention.pair_positions=none"])[0])
    sel = np.asarray(free.evaluate(free.params, batch, "soft")["selection"])
    np.testing.assert_allclose(sel.sum(axis=1), 1.0, atol=1e-6)
    assert np.abs(sel - rope).max() > 0.05
    np.testing.assert_array_equal(sel[:, -1][batch["base_intervention_mask"] == 0], 1.0)
    with pytest.raises(ConfigError, match="intervention.pair_positions must be 'rope' or 'none'"):
        tiny(["intervention.pair_positions=alibi"])


def test_similarity_prior_switch_changes_the_selection_only_when_on(setup):
    cfg, target, steps = setup
    batch = make_batch(np.random.default_rng(8))
    off = np.asarray(steps.evaluate(steps.params, batch, "soft")["selection"])
    on_cfg = tiny(["intervention.similarity_prior=4.0"])[0]
    on = Steps(steps.model(steps.params), target, on_cfg)
    sel = np.asarray(on.evaluate(on.params, batch, "soft")["selection"])
    np.testing.assert_allclose(sel.sum(axis=1), 1.0, atol=1e-6)
    assert np.abs(sel - off).max() > 0.05
    np.testing.assert_array_equal(sel[:, -1][batch["base_intervention_mask"] == 0], 1.0)  # masks still exact


@pytest.mark.parametrize("anchor_layer", [None, 1, 3])
def test_anchor_prior_adds_the_instructions_entity_similarity_to_the_pair_logits(setup, anchor_layer):
    """intervention.anchor_prior=β: A's columns become softmax(log A + β·prior) over the pair rows, the prior
    built from the target's own hs[A] of the prompts and of the instruction (the plain forward's states here),
    A = intervention.anchor_layer, or the intervention layer L by default."""
    from hyperdas_jax.models.selection import anchor_prior

    cfg, target, steps = setup
    batch = make_batch(np.random.default_rng(18))
    first = batch["editor_mask"].argmax(axis=1)
    batch["base_anchor_pos"] = (first + 1).astype(np.int32)  # some real instruction tokens after BOS
    batch["source_anchor_pos"] = (first + 2).astype(np.int32)
    off = np.asarray(steps.evaluate(steps.params, batch, "soft")["selection"], np.float64)
    beta = 3.0
    layer = "null" if anchor_layer is None else anchor_layer
    on = Steps(steps.model(steps.params), target,
               tiny([f"intervention.anchor_prior={beta}", f"intervention.anchor_layer={layer}"])[0])
    sel = np.asarray(on.evaluate(on.params, on.prepare(batch), "soft")["selection"], np.float64)

    A = cfg.intervention.layer if anchor_layer is None else anchor_layer
    hs = lambda ids, mask: np.asarray(target.hidden_states(ids, mask))[A]  # noqa: E731
    prior = np.asarray(anchor_prior(
        hs(batch["base_ids"], batch["base_mask"]), batch["base_intervention_mask"], batch["base_mask"],
        hs(batch["source_ids"], batch["source_mask"]), batch["source_intervention_mask"], batch["source_mask"],
        hs(batch["editor_ids"], batch["editor_mask"]), batch["editor_mask"], batch["base_anchor_pos"],
        batch["source_anchor_pos"]), np.float64)
    logits = np.log(np.maximum(off, 1e-300))
    logits[:, :-1] += beta * prior
    want = np.exp(logits - logits.max(axis=1, keepdims=True))
    want = np.where(off > 0, want, 0.0)
    want /= want.sum(axis=1, keepdims=True)
    assert np.abs(sel - off).max() > 0.05
    np.testing.assert_allclose(sel, want, atol=2e-5)
    np.testing.assert_array_equal(sel[:, -1][batch["base_intervention_mask"] == 0], 1.0)  # masks still exact


def test_anchor_prior_refuses_batches_without_named_entities(setup):
    _, target, steps = setup
    on = Steps(steps.model(steps.params), target, tiny(["intervention.anchor_prior=2.0"])[0])
    batch = make_batch(np.random.default_rng(19))
    with pytest.raises(ValueError, match="needs batches collated from RAVEL rows"):
        on.prepare(batch)
    batch["base_anchor_pos"] = np.array([2, 2, -1, 2], np.int32)
    batch["source_anchor_pos"] = np.array([3, 3, 3, 3], np.int32)
    batch["row_index"] = np.array([10, 11, 12, 13], np.int32)
    with pytest.raises(ValueError, match=r"row\(s\) \[12\] does not read"):
        on.prepare(batch)
    batch["valid"][2] = False  # a filler row's anchors are never used for a verdict
    assert on.prepare(batch) is batch


def test_straight_through_patches_with_the_hard_selection_and_trains_the_soft_one():
    """train.straight_through: the training forward is the soft one before its start step; from it on the
    first share of the rows is patched exactly as the hard mode patches at inference, while the selection
    head still gets a gradient (the hard mode alone gives it none). Evaluation never uses it."""
    def steps_for(share):
        cfg, target, model = tiny(["train.steps=10", "train.straight_through.mode=bidding_argmax",
                                   "train.straight_through.start_ratio=0.5", f"train.straight_through.share={share}",
                                   "train.sparsity.enabled=false"])  # its term would give the head a gradient
        for name in ("q_proj", "k_proj", "q_combine"):  # sharper A, so that some bids beat SELF
            kernel = getattr(model.head, name).kernel
            kernel[...] = kernel[...] * 15.0
        return Steps(model, target, cfg)

    steps = steps_for(0.5)
    batch = make_batch(np.random.default_rng(9))
    w = label_window(batch["labels"])
    train, soft, hard = (steps.context("soft", w, training=True), steps.context("soft", w),
                         steps.context("bidding_argmax", w))
    assert train.spec.straight_through_from == 5 and soft.spec.straight_through is None

    compiled = {}  # one program per (context, forward or gradient); the step is an argument

    def outputs(ctx, step, params=steps.params):
        run = compiled.setdefault(("forward", id(ctx)), jax.jit(
            lambda p, t, s: ctx.forward(nnx.merge(ctx.graphdef, p), nnx.merge(ctx.target_graphdef, t), batch,
                                        ctx.spec, s)))
        return run(params, steps.target_state, jnp.asarray(step))

    def grads(ctx, step, params=steps.params):
        grad = compiled.setdefault(("grad", id(ctx)), jax.jit(jax.grad(
            lambda p, t, s: loss_fn(p, t, batch, s, jax.random.key(0), ctx)[0])))
        return nnx.to_pure_dict(grad(params, steps.target_state, jnp.asarray(step)))

    hard_out = outputs(hard, 5)
    logits = {"soft": np.asarray(outputs(soft, 5).logits), "hard": np.asarray(hard_out.logits)}
    chosen = np.asarray(hard_out.selection)[:2, :-1]
    assert chosen.sum() > 0  # the hard mode patches something on the straight-through rows
    assert np.abs(logits["hard"][:2] - logits["soft"][:2]).max() > 1e-3
    np.testing.assert_allclose(np.asarray(outputs(train, 4).logits), logits["soft"], atol=1e-6, rtol=0)
    after = np.asarray(outputs(train, 5).logits)
    np.testing.assert_allclose(after[:2], logits["hard"][:2], atol=1e-5, rtol=0)
    np.testing.assert_allclose(after[2:], logits["soft"][2:], atol=1e-6, rtol=0)
    assert float(optax_norm(grads(hard, 5)["head"])) == 0.0
    assert float(optax_norm(grads(train, 5)["head"])) > 0

    # Every row through the hard selection: the subspace sees exactly the hard mode's patch, so its
    # gradient is the hard mode's; the head's is not zero.
    whole = steps_for(1.0)
    train_all = whole.context("soft", w, training=True)
    g_st, g_hard = grads(train_all, 7, whole.params), grads(hard, 7, whole.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g_st["subspace"],
                 g_hard["subspace"])
    assert float(optax_norm(g_st["head"])) > 0


def test_straight_through_head_lr_scale_slows_only_the_head_and_only_in_the_phase():
    """train.straight_through.head_lr_scale: from the phase's start step the selection head's update is the
    unscaled one times the factor; before it, and for every other group, the two runs are bit for bit equal."""
    from hyperdas_jax.train import param_group

    batch = make_batch(np.random.default_rng(12))
    moved = {}
    for scale in (1.0, 0.25):
        cfg, target, model = tiny(["train.steps=10", "train.straight_through.mode=bidding_argmax",
                                   "train.straight_through.start_ratio=0.5",
                                   f"train.straight_through.head_lr_scale={scale}"])
        steps = Steps(model, target, cfg)
        before = jax.tree.map(np.asarray, steps.params)
        for step in (4, 5):  # the last step before the phase, the first in it
            params, _, _ = steps.train(steps.params, steps.init_opt_state(steps.params), batch, step,
                                       jax.random.key(0))
            moved[scale, step] = jax.tree.map(lambda a, b: np.asarray(a) - b, params, before)
    leaves = {key: jax.tree.leaves(tree) for key, tree in moved.items()}
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(before)]
    assert any(param_group(path, cfg.train) == "head" for path in paths)
    for n, path in enumerate(paths):
        np.testing.assert_array_equal(leaves[0.25, 4][n], leaves[1.0, 4][n])
        if param_group(path, cfg.train) == "head":
            assert np.abs(leaves[1.0, 5][n]).max() > 0
            # params after minus before: float32 rounding of the subtraction, ~1e-9 against updates of ~1e-4
            np.testing.assert_allclose(leaves[0.25, 5][n], 0.25 * leaves[1.0, 5][n], rtol=1e-5, atol=1e-8)
        else:
            np.testing.assert_array_equal(leaves[0.25, 5][n], leaves[1.0, 5][n])


def test_memories_of_the_visible_tokens_only_give_the_same_step(setup):
    """Collated batches carry `*_memory_index`: the hypernetwork's memories then hold only the visible
    tokens (w of t positions), and loss, gradients, logits and A equal the full memories'."""
    from hyperdas_jax.data.collate import visible_index

    cfg, _, steps = setup
    batch = make_batch(np.random.default_rng(11))
    compact = dict(batch)
    for side in ("base", "source"):
        compact[f"{side}_memory_index"] = visible_index(batch[f"{side}_intervention_mask"], (4, 8, 12, 16))
        assert compact[f"{side}_memory_index"].shape[1] == 8 < batch[f"{side}_ids"].shape[1]
    window = label_window(batch["labels"])
    ctx = StepContext(steps.graphdef, steps.target_graphdef, spec_from_config(cfg, window=window), cfg.train)
    grad = jax.jit(jax.grad(loss_fn, has_aux=True), static_argnames="ctx")
    g0, m0 = assert_same_step(grad, ctx, steps.params, steps.target_state, batch, compact,
                              ("loss", "pred_loss", "sparsity", "accuracy"))
    assert float(m0["loss"]) > 0.1
    full, short = steps.evaluate(steps.params, batch), steps.evaluate(steps.params, compact)
    np.testing.assert_allclose(np.asarray(short["logits"]), np.asarray(full["logits"]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(short["selection"]), np.asarray(full["selection"]), atol=1e-6, rtol=0)
    # The index is read: naming other tokens changes the source memory's gradients.
    shifted = dict(compact, source_memory_index=np.where(compact["source_memory_index"] >= 0,
                                                          compact["source_memory_index"] - 1, -1))
    g2, _ = grad(steps.params, steps.target_state, shifted, 3, jax.random.key(0), ctx=ctx)
    k0, k2 = (np.asarray(g["hypernet"]["layers"][0]["source_cross_attn"]["k_proj"]["kernel"]) for g in (g0, g2))
    assert np.abs(k2 - k0).max() > 0.1 * np.abs(k0).max()


def test_residual_dropout_keeps_one_minus_rate_and_rescales():
    from hyperdas_jax.models.hypernet import residual_dropout

    y = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32, 48)).astype(np.float32))
    out = np.asarray(residual_dropout(y, 0.25, jax.random.key(3)))
    kept = out != 0
    assert abs(kept.mean() - 0.75) < 0.01  # 98 304 draws: the standard error is 0.0014
    np.testing.assert_allclose(out[kept], np.asarray(y)[kept] / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(out, np.asarray(residual_dropout(y, 0.25, jax.random.key(3))))  # one key, one mask
    assert not np.array_equal(out, np.asarray(residual_dropout(y, 0.25, jax.random.key(4))))


def test_hypernet_dropout_acts_in_training_steps_only(setup):
    """hypernet.dropout: the same weights evaluate exactly as without it; a training step's loss and gradients
    depend on the step's key (and equal the dropout-free ones at p=0 whatever the key); remat draws the same masks."""
    cfg, target, steps = setup
    batch = make_batch(np.random.default_rng(12))
    window = label_window(batch["labels"])
    grad = jax.jit(jax.grad(loss_fn, has_aux=True), static_argnames="ctx")
    drop_cfg = tiny(["hypernet.dropout=0.3"])[0]
    drop = Steps(steps.model(steps.params), target, drop_cfg)
    a, b = steps.evaluate(steps.params, batch), drop.evaluate(drop.params, batch)
    np.testing.assert_array_equal(np.asarray(b["logits"]), np.asarray(a["logits"]))

    def step(config, key, remat=False):
        spec = dataclasses.replace(spec_from_config(config, window=window, training=True), remat=remat)
        ctx = StepContext(steps.graphdef, steps.target_graphdef, spec, config.train)
        return grad(steps.params, steps.target_state, batch, 3, jax.random.key(key), ctx=ctx)

    (_, m_off), (_, m_off1) = step(cfg, 0), step(cfg, 1)
    assert float(m_off["loss"]) == float(m_off1["loss"])  # no dropout: the key is not used
    (g0, m0), (_, m0b), (g1, m1) = step(drop_cfg, 0), step(drop_cfg, 0), step(drop_cfg, 1)
    assert float(m0["loss"]) == float(m0b["loss"])
    assert float(m0["loss"]) != float(m1["loss"]) and float(m0["loss"]) != float(m_off["loss"])
    k = lambda g: np.asarray(g["hypernet"]["layers"][0]["mlp"]["down_proj"]["kernel"])  # noqa: E731
    assert np.abs(k(g0) - k(g1)).max() > 0.05 * np.abs(k(g0)).max()
    g_r, m_r = step(drop_cfg, 0, remat=True)
    np.testing.assert_allclose(float(m_r["loss"]), float(m0["loss"]), rtol=1e-5)
    np.testing.assert_allclose(k(g_r), k(g0), atol=1e-5 * max(1.0, np.abs(k(g0)).max()), rtol=0)
    with pytest.raises(ConfigError, match=r"hypernet.dropout must be in \[0, 1\)"):
        tiny(["hypernet.dropout=1.0"])


def test_one_hypernetwork_pass_serves_every_inference_mode(setup):
    from hyperdas_jax.clean_states import CleanStateCache
    from hyperdas_jax.models.hyperdas import forward, forward_modes
    from hyperdas_jax.models.selection import MODES

    cfg, target, steps = setup
    batch = make_batch(np.random.default_rng(11), b=5)
    spec = spec_from_config(cfg, window=label_window(batch["labels"]))
    model = steps.model(steps.params)
    together = forward_modes(model, target, batch, spec, MODES, spec.total_steps)
    assert list(together) == list(MODES)
    for mode in MODES:
        alone = forward(model, target, batch, dataclasses.replace(spec, mode=mode), spec.total_steps)
        np.testing.assert_allclose(np.asarray(together[mode].logits), np.asarray(alone.logits), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(together[mode].selection), np.asarray(alone.selection), atol=1e-6,
                                   rtol=0)
        np.testing.assert_array_equal(np.asarray(together[mode].labels), np.asarray(alone.labels))
    # The modes patch differently, so a row served from another mode's (or example's) lane would show above.
    gap = np.abs(np.asarray(together["soft"].logits) - np.asarray(together["groundtruth"].logits)).max(axis=(1, 2))
    assert (gap > 1e-3).all()

    # The jitted step: the verdicts and selections of one evaluate call per mode, cached states or not.
    for prepared in (batch, CleanStateCache(steps.target_graphdef, steps.target_state).attach(batch)):
        outs = steps.evaluate_modes(steps.params, prepared, MODES)
        for mode in MODES:
            one = steps.evaluate(steps.params, prepared, mode)
            np.testing.assert_array_equal(np.asarray(outs[mode]["correct"]), np.asarray(one["correct"]))
            np.testing.assert_allclose(np.asarray(outs[mode]["selection"]), np.asarray(one["selection"]), atol=1e-6,
                                       rtol=0)
    with pytest.raises(ValueError, match="at least one mode"):
        steps.evaluate_modes(steps.params, batch, ())
    with pytest.raises(ValueError, match="unknown selection mode"):
        steps.evaluate_modes(steps.params, batch, ("soft", "sideways"))
