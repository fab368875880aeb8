"""Shared helpers for HyperDAS tests: a tiny random target and synthetic collated batches."""

import jax
import numpy as np
from flax import nnx

from hyperdas_jax.config import load_config
from hyperdas_jax.models.hyperdas import build_hyperdas
from hyperdas_jax.models.llama import Llama
from hyperdas_jax.sharding import create_sharded

IGNORE = -100


def assert_same_step(grad, ctx, params, target_state, batch, other, metrics=("loss", "pred_loss", "sparsity")):
    """The jitted loss gradient `grad` (params, target_state, batch, step, rng) on `other` equals that on `batch`: the
    named metrics, and every gradient leaf to 1e-5 of its largest entry (absolutely, below 1). Returns `batch`'s
    gradients and metrics."""
    g0, m0 = grad(params, target_state, batch, 3, jax.random.key(0), ctx=ctx)
    g1, m1 = grad(params, target_state, other, 3, jax.random.key(0), ctx=ctx)
    for key in metrics:
        np.testing.assert_allclose(float(m1[key]), float(m0[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, atol=1e-5 * max(1.0, np.abs(a).max()), rtol=0,
                                   err_msg=jax.tree_util.keystr(path))
    return g0, m0


def tiny(overrides=()):
    cfg = load_config("configs/tiny.yaml", overrides)
    target = create_sharded(lambda: Llama(cfg.target.random, rngs=nnx.Rngs(1)))
    return cfg, target, build_hyperdas(target, cfg, seed=2)


def left_pad(rows, width, pad=0):
    out = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return out, mask


def make_batch(rng, b=4, vocab=97, te=10, tb=16, ts=14, lengths=None):
    """Random prompts: base = BOS prefix(entity last) suffix answer; source = BOS prefix suffix."""
    editor, base, source, base_iv, src_iv, labels, bpos, spos = [], [], [], [], [], [], [], []
    for i in range(b):
        n_e, n_bp, n_bs, n_a, n_sp, n_ss = lengths[i] if lengths else (
            rng.integers(4, te + 1), rng.integers(3, 7), rng.integers(1, 4), rng.integers(1, 4),
            rng.integers(3, 8), rng.integers(1, 5))
        editor.append(rng.integers(3, vocab, n_e))
        bp, bs, ans = rng.integers(3, vocab, n_bp), rng.integers(3, vocab, n_bs), rng.integers(3, vocab, n_a)
        base.append(np.concatenate([[1], bp, bs, ans]))
        base_iv.append(np.concatenate([np.ones(1 + n_bp), np.zeros(n_bs + n_a)]))
        labels.append(np.concatenate([np.full(1 + n_bp + n_bs, IGNORE), ans]))
        sp, ss = rng.integers(3, vocab, n_sp), rng.integers(3, vocab, n_ss)
        source.append(np.concatenate([[1], sp, ss]))
        src_iv.append(np.concatenate([np.ones(1 + n_sp), np.zeros(n_ss)]))
    batch = {}
    batch["editor_ids"], batch["editor_mask"] = left_pad(editor, te)
    batch["base_ids"], batch["base_mask"] = left_pad(base, tb)
    batch["source_ids"], batch["source_mask"] = left_pad(source, ts)
    batch["base_intervention_mask"] = left_pad(base_iv, tb)[0]
    batch["source_intervention_mask"] = left_pad(src_iv, ts)[0]
    batch["labels"] = left_pad(labels, tb, IGNORE)[0]
    # last prefix token = the "entity"; positions in the padded arrays
    batch["base_entity_pos"] = np.array([tb - len(r) + int(iv.sum()) - 1 for r, iv in zip(base, base_iv)], np.int32)
    batch["source_entity_pos"] = np.array([ts - len(r) + int(iv.sum()) - 1 for r, iv in zip(source, src_iv)],
                                          np.int32)
    batch["is_causal"] = np.arange(b) % 2 == 0
    batch["valid"] = np.ones(b, bool)
    return batch
