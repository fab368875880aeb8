"""MDAS baseline (§10): one static rank-k DAS rotation per attribute at a fixed position, in the HyperDAS engine.

For a row whose instruction names attribute A, the base residual at its last entity token is
patched with b' = b + R_A R_Aᵀ (s − b), s the source residual at the source's last entity token.
The site is the residual stream hs[L] entering block L, the same one HyperDAS patches for the same
`intervention.layer`. (The original MDAS used pyvene's `block_output` of layer L, i.e. hs[L+1]: to
reproduce that site, set `intervention.layer` one higher.) Training uses the same loss, optimizer
code (all parameters sit under `rotate_layer`, so `train.rotate_lr` is MDAS's learning rate) and
jitted steps; the evaluator scores it through the same eval-step interface.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyperdas_jax.config import ExperimentConfig, check_fits_target
from hyperdas_jax.models.hyperdas import ForwardSpec, Outputs
from hyperdas_jax.models.intervention import Orthonormal
from hyperdas_jax.models.llama import Llama
from hyperdas_jax.train import Steps

# Config overrides that turn a HyperDAS experiment config into MDAS training (§10): AdamW on the
# rotations only, no clipping, causal/isolate weights 7.5/1. The original's lr 1e-4 goes with 5
# epochs over 20,000+ rows per attribute; for runs of a few hundred steps (the CPU main job and
# layer sweep) the rotations get HyperDAS's rotation lr, 1e-3, so the short budget starves neither.
TRAIN_OVERRIDES = ("train.rotate_lr=1e-3", "train.causal_loss_weight=7.5", "train.iso_loss_weight=1.0",
                   "train.clip_norm=1e9")


class MDAS(nnx.Module):
    """Per-attribute orthonormal R_a (d, k), stacked: `rotate_layer[a]`."""

    def __init__(self, dim: int, rank: int, n_tasks: int, *, rngs: nnx.Rngs):
        self.rotate_layer = nnx.List([Orthonormal(dim, rank, rngs=rngs) for _ in range(n_tasks)])

    def bases(self) -> jax.Array:
        """(a, d, k) float32."""
        return jnp.stack([r() for r in self.rotate_layer])


def mdas_forward(model: MDAS, target: Llama, batch: dict, spec: ForwardSpec, step=0, rng=None) -> Outputs:
    """Fixed-position DAS: patch hs[L] at base_entity_pos with the source at source_entity_pos."""
    del step, rng
    L = spec.layer
    b_attn = target.attn_inputs(batch["base_mask"])
    if "base_layer_states" in batch:  # cached hs[L] (clean_states.CleanStateCache with layer=L), (b, t, d)
        dtype = jnp.dtype(target.config.dtype)
        base = jax.lax.stop_gradient(jnp.asarray(batch["base_layer_states"]).astype(dtype))  # (b, tb, d)
        src = jax.lax.stop_gradient(jnp.asarray(batch["source_layer_states"]).astype(dtype))  # (b, ts, d)
    else:
        base = jax.lax.stop_gradient(target.residual_stream(batch["base_ids"], batch["base_mask"], L))  # (b, tb, d)
        src = jax.lax.stop_gradient(target.residual_stream(batch["source_ids"], batch["source_mask"], L))  # (b, ts, d)
    rows = jnp.arange(base.shape[0])
    b_vec = base[rows, batch["base_entity_pos"]].astype(jnp.float32)  # (b, d)
    s_vec = src[rows, batch["source_entity_pos"]].astype(jnp.float32)  # (b, d)
    r = model.bases()[batch["task_id"]]  # (b, d, k)
    coords = jnp.einsum("bd,bdk->bk", s_vec - b_vec, r)
    patched_vec = b_vec + jnp.einsum("bk,bdk->bd", coords, r)
    h = base.at[rows, batch["base_entity_pos"]].set(patched_vec.astype(base.dtype))
    h = target.run_layers(h, b_attn, L)
    w = spec.window
    return Outputs(target.unembed(h[:, -w - 1:-1]), batch["labels"][:, -w:], None, None)


def build_mdas(target: Llama, cfg: ExperimentConfig, n_tasks: int, *, seed: int = 0, mesh=None) -> MDAS:
    from hyperdas_jax.sharding import create_sharded

    check_fits_target(cfg, target.config)
    rank = cfg.intervention.rank
    return create_sharded(lambda: MDAS(target.config.hidden_size, rank, n_tasks, rngs=nnx.Rngs(seed)), mesh)


def mdas_steps(model: MDAS, target: Llama, cfg: ExperimentConfig) -> Steps:
    """Jitted MDAS train/eval/baseline steps (sparsity and inference modes do not apply)."""
    return Steps(model, target, cfg, forward_fn=mdas_forward)


class MDASMethod:
    """The evaluator's view of MDAS: every inference mode is the same fixed-position patch."""

    name = "mdas"

    def __init__(self, steps: Steps, params, tasks: dict[str, int], row_tasks: np.ndarray | None = None):
        self.steps, self.params, self.tasks = steps, params, tasks
        self.row_tasks = row_tasks

    def with_rows(self, row_tasks: np.ndarray) -> "MDASMethod":
        """The same method for a dataset whose row i has attribute id row_tasks[i]."""
        return MDASMethod(self.steps, self.params, self.tasks, row_tasks)

    def add_tasks(self, batch: dict) -> dict:
        if "task_id" in batch:
            return batch
        if self.row_tasks is None:
            raise ValueError("MDASMethod needs row attribute ids: call with_rows(...) or give batch['task_id']")
        return {**batch, "task_id": self.row_tasks[np.maximum(batch["row_index"], 0)].astype(np.int32)}

    def eval_batch(self, batch: dict, mode: str) -> dict:
        del mode
        out = self.steps.evaluate(self.params, self.steps.prepare(self.add_tasks(batch)), "soft")
        return {"correct": np.asarray(out["correct"]), "selection": None}

    def eval_modes(self, batch: dict, modes) -> dict:
        """Every mode is the same patch: one pass serves them all."""
        out = self.eval_batch(batch, "soft")
        return {mode: out for mode in modes}

    def baseline_batch(self, batch: dict) -> dict:
        return {"correct": np.asarray(self.steps.baseline(self.steps.prepare_baseline(batch))["correct"])}


def row_task_ids(rows, tasks: dict[str, int] | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Attribute id per row (the attribute its instruction names), and the attribute -> id map."""
    from hyperdas_jax.data.ravel_schema import instruction_attribute

    names = [instruction_attribute(r) for r in rows]
    tasks = dict(tasks) if tasks is not None else {a: i for i, a in enumerate(sorted(set(names)))}
    unknown = sorted(set(names) - set(tasks))
    if unknown:
        raise ValueError(f"MDAS was not trained for attributes {unknown}")
    return np.asarray([tasks[a] for a in names], np.int32), tasks


def train_mdas(target: Llama, cfg: ExperimentConfig, rows, tokenizer, *, metrics_path=None, progress=True,
               mesh=None) -> MDASMethod:
    """Trains one rotation per attribute on `rows` for cfg.train.steps steps (shuffled epochs).

    The same jitted train step, loss (causal/isolate weights) and optimizer code as HyperDAS;
    `train.rotate_lr` is the rotations' learning rate. Metrics go to `metrics_path` as JSONL.
    As `train.state_cache` allows, every distinct prompt's hs[L] is computed once up front and the
    step runs only blocks [L, n) (the returned method keeps that cache for its evaluation).
    """
    import json

    import tqdm

    from hyperdas_jax.clean_states import make_cache
    from hyperdas_jax.data.collate import CollateOptions, encode_rows, iterate_batches

    rows = list(rows)
    row_tasks, tasks = row_task_ids(rows)
    options = CollateOptions(batch_size=cfg.train.batch_size, base_suffix_visible=cfg.data.base_suffix_visible,
                             source_suffix_visible=cfg.data.source_suffix_visible)
    encoded = encode_rows(rows, tokenizer, options)
    model = build_mdas(target, cfg, len(tasks), seed=cfg.train.seed, mesh=mesh)
    steps = mdas_steps(model, target, cfg)
    steps.cache = make_cache(steps, encoded.examples, what="MDAS training", progress=progress,
                             layer=cfg.intervention.layer)
    method = MDASMethod(steps, steps.params, tasks, row_tasks)
    params, opt = steps.params, steps.init_opt_state(steps.params)
    key = jax.random.key(cfg.train.seed)
    out = open(metrics_path, "w") if metrics_path else None
    bar = tqdm.tqdm(total=cfg.train.steps, desc="MDAS", disable=not progress, dynamic_ncols=True)
    step, epoch = 0, 0
    try:
        while step < cfg.train.steps:
            for batch in iterate_batches(encoded, options, shuffle=True, seed=cfg.train.seed + epoch,
                                         drop_remainder=True):
                if step >= cfg.train.steps:
                    break
                params, opt, metrics = steps.train(params, opt, steps.prepare(method.add_tasks(batch)), step, key)
                step += 1
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                    if out:
                        out.write(json.dumps(record) + "\n")
                        out.flush()
                bar.update(1)
            epoch += 1
    finally:
        bar.close()
        if out:
            out.close()
    return MDASMethod(steps, params, tasks)
