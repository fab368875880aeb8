"""The clean-state cache: a cached step computes what the uncached step computes, and a prompt is run once."""

import jax
import numpy as np
import pytest

from hyperdas_jax.clean_states import CleanStateCache, estimate_bytes, make_cache
from hyperdas_jax.config import ConfigError
from hyperdas_jax.train import StepContext, Steps, label_window, loss_fn, spec_from_config
from hyperdas_fixtures import assert_same_step, make_batch, tiny


@pytest.fixture(scope="module")
def setup():
    cfg, target, model = tiny()
    return cfg, target, Steps(model, target, cfg)


def _cache(steps, limit=None):
    return CleanStateCache(steps.target_graphdef, steps.target_state, limit)


def test_cached_states_equal_the_clean_passes(setup):
    _, target, steps = setup
    batch = make_batch(np.random.default_rng(0))
    cached = _cache(steps).attach(batch)
    hs = np.asarray(target.hidden_states(batch["base_ids"], batch["base_mask"]))  # (n+1, b, t, d)
    real = batch["base_mask"] > 0
    got = np.moveaxis(cached["base_states"], 1, 0)
    np.testing.assert_allclose(got[:, real], hs[:, real], atol=1e-5, rtol=0)
    assert (got[:, ~real] == 0).all()  # pads are zeros, never read by the model


def test_cached_step_gives_the_same_loss_and_gradients(setup):
    cfg, _, steps = setup
    batch = make_batch(np.random.default_rng(1))
    window = label_window(batch["labels"])
    ctx = StepContext(steps.graphdef, steps.target_graphdef, spec_from_config(cfg, window=window), cfg.train)
    grad = jax.jit(jax.grad(loss_fn, has_aux=True), static_argnames="ctx")
    _, m0 = assert_same_step(grad, ctx, steps.params, steps.target_state, batch, _cache(steps).attach(batch),
                             ("loss", "pred_loss", "sparsity", "accuracy"))
    assert float(m0["loss"]) > 0.1
    # Evaluation too: the same logits and selection.
    plain, cached = steps.evaluate(steps.params, batch), steps.evaluate(steps.params, _cache(steps).attach(batch))
    np.testing.assert_allclose(np.asarray(cached["logits"]), np.asarray(plain["logits"]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(cached["selection"]), np.asarray(plain["selection"]), atol=1e-6, rtol=0)


def test_each_prompt_runs_once_and_the_limit_holds(setup):
    _, _, steps = setup
    rng = np.random.default_rng(2)
    a, b = make_batch(rng), make_batch(rng)
    cache = _cache(steps)
    first = cache.attach(a)
    assert (cache.misses, cache.hits, len(cache)) == (8, 0, len({r.tobytes() for r in a["base_ids"]}) + 4)
    again = cache.attach(a)
    assert cache.misses == 8 and cache.hits == 8
    for key in ("base_states", "source_states"):
        np.testing.assert_array_equal(again[key], first[key])
    # Reordered and re-padded rows (another batch's shape) are hits.
    wider = {k: v[::-1] for k, v in a.items()}
    for key, mask in (("base_ids", "base_mask"), ("source_ids", "source_mask")):
        wider[key] = np.pad(wider[key], ((0, 0), (3, 0)))
        wider[mask] = np.pad(wider[mask], ((0, 0), (3, 0)))
    out = cache.attach(wider)
    assert cache.misses == 8 and cache.hits == 16
    np.testing.assert_array_equal(out["base_states"][:, :, 3:], first["base_states"][::-1])
    # A prompt twice in one batch (filler rows repeat the first example) is computed once.
    twice = {k: np.concatenate([v[:1], v[:1]]) for k, v in b.items()}
    fresh = _cache(steps)
    got = fresh.attach(twice)
    assert (fresh.misses, fresh.hits, len(fresh)) == (2, 2, 2)
    np.testing.assert_array_equal(got["base_states"][0], got["base_states"][1])
    # A cache at its byte limit keeps nothing new, and still gives the right states.
    full = _cache(steps, limit=cache.nbytes // 4)
    got = full.attach(b)
    assert full.nbytes <= cache.nbytes // 4
    np.testing.assert_allclose(got["source_states"], _cache(steps).attach(b)["source_states"], atol=0)


def test_fill_computes_in_a_fixed_order(setup):
    from hyperdas_jax.clean_states import distinct_prompts
    from hyperdas_jax.data.collate import EncodedExample

    _, _, steps = setup
    batch = make_batch(np.random.default_rng(3))
    real = lambda ids, mask: [tuple(int(t) for t in r[m > 0]) for r, m in zip(ids, mask)]  # noqa: E731
    bases, sources = real(batch["base_ids"], batch["base_mask"]), real(batch["source_ids"], batch["source_mask"])
    examples = [EncodedExample((1,), b, 2, 0, 1, s, 0, 1, True, i) for i, (b, s) in enumerate(zip(bases, sources))]
    prompts = distinct_prompts(examples + examples[:2])
    assert len(prompts) == 8 and [len(p) for p in prompts] == sorted(len(p) for p in prompts)
    one, two = _cache(steps), _cache(steps)
    one.fill(prompts, batch_size=3, progress=False)
    two.fill(prompts, batch_size=3, progress=False)
    assert one.misses == 8 and len(one) == 8
    a, b = one.attach(batch), two.attach(batch)
    assert one.misses == 8 and one.hits == 8  # everything came from the fill
    for key in ("base_states", "source_states"):
        np.testing.assert_array_equal(a[key], b[key])  # the same order gives the same bits
        np.testing.assert_allclose(a[key], _cache(steps).attach(batch)[key], atol=1e-5, rtol=0)


def test_make_cache_follows_the_config(setup, capsys):
    from hyperdas_jax.data.collate import EncodedExample

    cfg, target, steps = setup
    ex = [EncodedExample((1, 5, 6), (1, 5, 6, 7), 3, 1, 1, (1, 8), 0, 1, True, 0),
          EncodedExample((1, 5), (1, 5, 6, 7), 3, 1, 1, (1, 9, 9), 0, 1, False, 1)]
    n, d = target.config.num_hidden_layers + 1, target.config.hidden_size
    assert estimate_bytes(ex, n, d) == (4 + 2 + 3) * n * d * 4  # the repeated base prompt counts once
    assert estimate_bytes(ex, n, d, itemsize=2) == (4 + 2 + 3) * n * d * 2  # a bfloat16 target's states
    assert make_cache(steps, ex) is not None and "on" in capsys.readouterr().err
    for overrides, expected in ((["train.state_cache=never"], None), (["train.state_cache_gb=0"], None)):
        s = Steps(steps.model(steps.params), target, tiny(overrides)[0])
        assert make_cache(s, ex) is expected
    assert make_cache(steps, None) is None  # auto with unknown rows: recompute
    with pytest.raises(ConfigError, match="train.state_cache must be"):
        tiny(["train.state_cache=maybe"])


def test_cached_instruction_states_serve_the_anchor_prior(setup):
    """intervention.anchor_prior reads the target's hs[L] of the instruction: cached once per instruction, the
    step computes the same loss, gradients and selection as with the states computed in the step."""
    from hyperdas_jax.data.collate import EncodedExample

    _, target, steps = setup
    cfg = tiny(["intervention.anchor_prior=3.0"])[0]
    on = Steps(steps.model(steps.params), target, cfg)
    batch = make_batch(np.random.default_rng(4))
    first = batch["editor_mask"].argmax(axis=1)
    batch["base_anchor_pos"], batch["source_anchor_pos"] = (first + 1).astype(np.int32), (first + 2).astype(np.int32)
    L = cfg.intervention.layer
    cache = CleanStateCache(on.target_graphdef, on.target_state, instruction_layer=L)
    cached = cache.attach(batch)
    real = batch["editor_mask"] > 0
    hs = np.asarray(target.hidden_states(batch["editor_ids"], batch["editor_mask"]))[L]  # (b, e, d)
    np.testing.assert_allclose(cached["editor_layer_states"][real], hs[real], atol=1e-5, rtol=0)
    assert (cached["editor_layer_states"][~real] == 0).all() and len(cache.instructions) == 4

    window = label_window(batch["labels"])
    ctx = StepContext(on.graphdef, on.target_graphdef, spec_from_config(cfg, window=window), cfg.train)
    grad = jax.jit(jax.grad(loss_fn, has_aux=True), static_argnames="ctx")
    assert_same_step(grad, ctx, on.params, on.target_state, batch, cached)
    plain, fast = on.evaluate(on.params, batch), on.evaluate(on.params, cached)
    np.testing.assert_allclose(np.asarray(fast["selection"]), np.asarray(plain["selection"]), atol=1e-6, rtol=0)

    # make_cache builds the instruction store when the prior is on, and counts it in its estimate.
    ex = [EncodedExample((1, 5, 6), (1, 5, 6, 7), 3, 1, 1, (1, 8), 0, 1, True, 0, (1, 2)),
          EncodedExample((1, 5), (1, 5, 6, 7), 3, 1, 1, (1, 9, 9), 0, 1, False, 1, (1, 1)),
          EncodedExample((1, 5), (1, 5, 6, 8), 3, 1, 1, (1, 9, 9), 0, 1, False, 2, (1, 1))]
    made = make_cache(on, ex, progress=False)
    assert len(made.instructions) == 2 and len(made) == 4  # 2 distinct bases, 2 distinct sources
    assert make_cache(steps, ex, progress=False).instructions is None  # the prior off: nothing extra
    assert made.instructions.layer == L  # the anchor states' layer: the intervention's by default, else its own
    other = Steps(steps.model(steps.params), target, tiny(["intervention.anchor_prior=3.0",
                                                            "intervention.anchor_layer=1"])[0])
    assert make_cache(other, ex, progress=False).instructions.layer == 1


def test_a_bfloat16_target_keeps_its_states_in_bfloat16_at_half_the_bytes(setup):
    import dataclasses

    import ml_dtypes
    from flax import nnx

    from hyperdas_jax.models.llama import Llama
    from hyperdas_jax.sharding import create_sharded

    cfg, target, steps = setup
    bf_target = create_sharded(lambda: Llama(dataclasses.replace(cfg.target.random, dtype="bfloat16"),
                                             rngs=nnx.Rngs(1)))
    bf_graphdef, bf_state = nnx.split(bf_target)
    batch = make_batch(np.random.default_rng(4))
    f32_cache, bf_cache = _cache(steps), CleanStateCache(bf_graphdef, bf_state)
    want, got = f32_cache.attach(batch)["base_states"], bf_cache.attach(batch)["base_states"]
    assert want.dtype == np.float32 and got.dtype == ml_dtypes.bfloat16
    assert bf_cache.nbytes * 2 == f32_cache.nbytes
    real = batch["base_mask"] > 0
    got, want = np.moveaxis(got.astype(np.float32), 1, 0), np.moveaxis(want, 1, 0)  # (n+1, b, t, d)
    assert (got[:, ~real] == 0).all()
    np.testing.assert_allclose(got[:, real], want[:, real], atol=0.05 * np.abs(want).max(), rtol=0)


def test_the_baseline_reads_the_cached_final_states(setup):
    _, _, steps = setup
    batch = make_batch(np.random.default_rng(9))
    cache = _cache(steps)
    final = cache.final_states(batch["base_ids"], batch["base_mask"])  # (b, t, d)
    np.testing.assert_array_equal(final, cache.attach(batch)["base_states"][:, -1])
    plain, cached = steps.baseline(batch), steps.baseline({**batch, "base_final_states": final})
    np.testing.assert_allclose(np.asarray(cached["logits"]), np.asarray(plain["logits"]), atol=1e-5, rtol=0)
    assert np.abs(np.asarray(plain["logits"])).max() > 0.1
    np.testing.assert_array_equal(np.asarray(cached["correct"]), np.asarray(plain["correct"]))
    # Steps attaches them only when a full cache is set.
    assert steps.prepare_baseline(batch) is batch
    steps.cache = cache
    try:
        np.testing.assert_array_equal(steps.prepare_baseline(batch)["base_final_states"], final)
        steps.cache = CleanStateCache(steps.target_graphdef, steps.target_state, layer=1)
        assert steps.prepare_baseline(batch) is batch
    finally:
        steps.cache = None
    with pytest.raises(ValueError, match="not the final states"):
        CleanStateCache(steps.target_graphdef, steps.target_state, layer=1).final_states(batch["base_ids"],
                                                                                       batch["base_mask"])
