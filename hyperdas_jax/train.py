"""Loss, optimizer, and the jitted HyperDAS train and eval steps (pure functions of explicit state)."""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hyperdas_jax.config import ExperimentConfig, TrainConfig
from hyperdas_jax.models.hyperdas import MISSING_ANCHORS, ForwardSpec, forward, forward_modes
from hyperdas_jax.models.selection import sparsity_loss, sparsity_weight
from hyperdas_jax.sharding import use_mesh

IGNORE = -100
WINDOWS = (4, 8, 16, 32, 64, 128)  # label-window buckets: a handful of compiled programs


# --------------------------------------------------------------------------------------------
# Loss and metrics


def token_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token NLL (b, w) (0 where labels == IGNORE) and the label mask (b, w)."""
    valid = labels != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, nll, 0.0), valid


def answer_loss(logits, labels, is_causal, valid_rows, causal_weight: float, iso_weight: float):
    """§7.1: mean over all answer tokens of w·NLL, w = causal/isolate weight (a plain mean, not / Σw)."""
    nll, tok = token_nll(logits, labels)
    tok = tok & valid_rows[:, None]
    w = jnp.where(is_causal, causal_weight, iso_weight)[:, None]
    count = jnp.maximum(jnp.sum(tok), 1)
    return jnp.sum(jnp.where(tok, w * nll, 0.0)) / count, jnp.sum(jnp.where(tok, nll, 0.0)) / count


def exact_match(logits: jax.Array, labels: jax.Array, k: int | None) -> jax.Array:
    """(b,) bool: teacher-forced argmax equals the gold token at each of the first k answer tokens."""
    valid = labels != IGNORE
    index = jnp.cumsum(valid, axis=1) - 1
    considered = valid & (index < k) if k is not None else valid
    hit = jnp.argmax(logits, axis=-1) == labels
    return jnp.all(jnp.where(considered, hit, True), axis=1) & jnp.any(considered, axis=1)


def label_window(labels: np.ndarray) -> int:
    """Smallest bucket covering every label position (answers sit at the end of the left-padded base)."""
    labels = np.asarray(labels)
    has = (labels != IGNORE).any(axis=0)
    if not has.any():
        raise ValueError("batch has no label tokens")
    span = labels.shape[1] - int(np.argmax(has))
    for w in WINDOWS:
        if span <= w and w < labels.shape[1]:
            return w
    return labels.shape[1] - 1 if span < labels.shape[1] else _raise_label_at_zero()


def _raise_label_at_zero():
    raise ValueError("a label sits at position 0, where nothing predicts it")


# --------------------------------------------------------------------------------------------
# Optimizer


def param_group(path, cfg: TrainConfig | None = None) -> str:
    """Optimizer group of a parameter path: R (`rotate_layer`), MaskSelect/boundary (`mask_projection`),
    ReflectSelect's reflection-vector MLP (`rv_norm`, `rv_proj`; its own group only when `cfg.reflect_lr`
    is set, so the default optimizer state keeps the original's structure), the selection head
    (top-level `head`), the rest."""
    key = jax.tree_util.keystr(path)
    if "rotate_layer" in key:
        return "rotate"
    if "mask_projection" in key:
        return "mask"
    if cfg is not None and cfg.reflect_lr is not None and ("['rv_proj']" in key or "['rv_norm']" in key):
        return "reflect"
    if key.startswith("['head']"):
        return "head"
    return "default"


def lr_scale(cfg: TrainConfig) -> optax.Schedule:
    """Factor on every learning rate at update `count`: 1, then linearly to 0 over the last lr_decay_ratio."""
    decay = round(cfg.lr_decay_ratio * cfg.steps)
    return optax.linear_schedule(1.0, 0.0, transition_steps=max(decay, 1), transition_begin=cfg.steps - decay)


def phase_scaled(updates, step, cfg: TrainConfig):
    """`updates` with the selection head's scaled by `straight_through.head_lr_scale` from the phase's start.

    Scaling an AdamW update scales that group's learning rate (weight decay included) without touching
    the optimizer state, so a run can change it at a branch point.
    """
    st = cfg.straight_through
    if st.mode is None or st.head_lr_scale == 1.0:
        return updates
    factor = jnp.where(jnp.asarray(step) >= st.start_step(cfg.steps), st.head_lr_scale, 1.0)
    return jax.tree_util.tree_map_with_path(
        lambda p, u: u * factor.astype(u.dtype) if param_group(p, cfg) == "head" else u, updates)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm, then per-group AdamW (β 0.9/0.999, ε 1e-8), constant learning rates (§7.3).

    With `lr_decay_ratio` > 0 every group's update (weight decay included) is scaled by `lr_scale`; at 0 the
    optimizer state has the original's structure, so older checkpoints resume.
    """
    adamw = functools.partial(optax.adamw, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
    groups = {
        "default": adamw(cfg.lr),
        "rotate": adamw(cfg.rotate_lr, weight_decay=0.0),
        "mask": adamw(cfg.mask_lr),
        "head": adamw(cfg.lr if cfg.head_lr is None else cfg.head_lr),
    }
    if cfg.reflect_lr is not None:
        groups["reflect"] = adamw(cfg.reflect_lr)
    labels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: param_group(p, cfg), params)  # noqa: E731
    parts = [optax.clip_by_global_norm(cfg.clip_norm), optax.multi_transform(groups, labels)]
    if cfg.lr_decay_ratio > 0:
        parts.append(optax.scale_by_schedule(lr_scale(cfg)))
    return optax.chain(*parts)


# --------------------------------------------------------------------------------------------
# Steps


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Static pieces of the compiled steps: module structures and hyperparameters (no weights)."""

    graphdef: Any
    target_graphdef: Any
    spec: ForwardSpec
    train: TrainConfig
    n_answer_tokens: int | None = 3
    forward: Any = forward  # (model, target, batch, spec, step, rng) -> Outputs; MDAS brings its own


def spec_from_config(cfg: ExperimentConfig, *, mode: str = "soft", window: int = 8,
                     training: bool = False) -> ForwardSpec:
    """The forward's static choices; `training` adds the straight-through selection (train.straight_through)
    and the editor's dropout (hypernet.dropout)."""
    iv = cfg.intervention
    st = cfg.train.straight_through
    extras = {}  # training steps only
    if training and st.mode is not None:
        extras = dict(straight_through=st.mode, straight_through_from=st.start_step(cfg.train.steps),
                      straight_through_share=st.share)
    if training:
        extras["dropout"] = cfg.hypernet.dropout
    return ForwardSpec(layer=iv.layer, mode=mode, window=window, total_steps=cfg.train.steps,
                       temperature_start=iv.temperature_start, temperature_end=iv.temperature_end,
                       bidding_threshold=iv.bidding_threshold, break_asymmetric=cfg.hypernet.break_asymmetric,
                       remat=cfg.target.remat, similarity_prior=iv.similarity_prior,
                       anchor_prior=iv.anchor_prior, anchor_layer=iv.anchor_states_layer,
                       self_positions=iv.self_positions, pair_positions=iv.pair_positions, **extras)


def check_anchors(batch: dict) -> None:
    """intervention.anchor_prior needs every real row's instruction to name both entities ("B ; S - A")."""
    if "base_anchor_pos" not in batch or "source_anchor_pos" not in batch:
        raise ValueError(MISSING_ANCHORS)
    valid = np.asarray(batch.get("valid", np.ones(len(batch["base_anchor_pos"]), bool)), bool)
    missing = valid & ((np.asarray(batch["base_anchor_pos"]) < 0) | (np.asarray(batch["source_anchor_pos"]) < 0))
    if missing.any():
        rows = np.asarray(batch.get("row_index", np.arange(len(valid))))[missing]
        raise ValueError(f"intervention.anchor_prior: the instruction of row(s) {rows[:5].tolist()} does not read "
                         "'{base entity} ; {source entity} - {attribute}', so it names no entity to anchor to")


def loss_fn(params, target_state, batch, step, rng, ctx: StepContext):
    model = nnx.merge(ctx.graphdef, params)
    target = nnx.merge(ctx.target_graphdef, target_state)
    out = ctx.forward(model, target, batch, ctx.spec, step, rng)
    t = ctx.train
    pred, plain = answer_loss(out.logits, out.labels, batch["is_causal"], batch["valid"],
                              t.causal_loss_weight, t.iso_loss_weight)
    sparsity = jnp.float32(0.0)
    weight = 0.0
    if out.soft_selection is not None:
        sparsity = sparsity_loss(out.soft_selection, batch["valid"], t.sparsity.form)
    if t.sparsity.enabled and out.soft_selection is not None:
        s = t.sparsity
        weight = sparsity_weight(step, t.steps, start=s.start, end=s.end, warmup_ratio=s.warmup_ratio,
                                 schedule=s.schedule)
    correct = exact_match(out.logits, out.labels, ctx.n_answer_tokens)
    metrics = {"loss": pred + weight * sparsity, "pred_loss": pred, "nll": plain, "sparsity": sparsity,
               "sparsity_weight": jnp.asarray(weight, jnp.float32),
               "accuracy": jnp.sum(correct & batch["valid"]) / jnp.maximum(jnp.sum(batch["valid"]), 1)}
    return pred + weight * sparsity, metrics


def train_step(params, opt_state, target_state, batch, step, rng, *, ctx: StepContext, tx):
    """One update. Only `params` (the HyperDAS tree) is differentiated; the target is an input.

    A step whose loss or gradient is not finite changes nothing (parameters and optimizer state come
    back as they went in) and reports `finite` = False, so the caller can stop on a state that is
    still the last finite one.
    """
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, target_state, batch, step, rng, ctx)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    updates = phase_scaled(updates, step, ctx.train)
    new_params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    metrics["finite"] = finite
    return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state), metrics


def eval_step(params, target_state, batch, *, ctx: StepContext):
    """Logits at the answer window, the selection A used, and per-example exact match."""
    model = nnx.merge(ctx.graphdef, params)
    target = nnx.merge(ctx.target_graphdef, target_state)
    out = ctx.forward(model, target, batch, ctx.spec, ctx.spec.total_steps)
    nll, tok = token_nll(out.logits, out.labels)
    return {"logits": out.logits, "labels": out.labels, "selection": out.selection,
            "correct": exact_match(out.logits, out.labels, ctx.n_answer_tokens),
            "nll": jnp.sum(nll, axis=1) / jnp.maximum(jnp.sum(tok, axis=1), 1)}


def eval_modes_step(params, target_state, batch, *, ctx: StepContext, modes: tuple[str, ...]):
    """`eval_step` in several inference modes from one hypernetwork pass (`forward_modes`; HyperDAS only):
    mode -> {"correct": (b,) exact match, "selection": (b, t_s+1, t_b) the A used}."""
    model = nnx.merge(ctx.graphdef, params)
    target = nnx.merge(ctx.target_graphdef, target_state)
    outs = forward_modes(model, target, batch, ctx.spec, modes, ctx.spec.total_steps)
    return {mode: {"correct": exact_match(out.logits, out.labels, ctx.n_answer_tokens), "selection": out.selection}
            for mode, out in outs.items()}


def baseline_step(target_state, batch, *, target_graphdef, window: int, n_answer_tokens: int | None):
    """The do-nothing baseline: the target on the base alone, scored with the same labels.

    A batch carrying `base_final_states` (the clean base's hs[n] from a clean-state cache,
    `Steps.prepare_baseline`) needs only the LM head; otherwise the target runs over the base.
    """
    target = nnx.merge(target_graphdef, target_state)
    if "base_final_states" in batch:  # (b, t, d): the final norm's output in the clean pass over the base
        normed = batch["base_final_states"][:, -window - 1:-1].astype(jnp.dtype(target.config.dtype))
        logits = target.lm_logits(normed)
    else:
        h = target.run_layers(target.embed(batch["base_ids"]), target.attn_inputs(batch["base_mask"]))
        logits = target.unembed(h[:, -window - 1:-1])
    labels = batch["labels"][:, -window:]
    return {"logits": logits, "labels": labels, "correct": exact_match(logits, labels, n_answer_tokens)}


def opt_state_shardings(tx: optax.GradientTransformation, params):
    """Shardings of `tx.init(params)`: each Adam moment like its parameter, everything else replicated.

    Left to propagation, `zeros_like` moments come out replicated (nothing ties them to the
    parameter), which for an 8B-scale hypernetwork would be the largest buffers in the program.
    A moment is matched to its parameter by key-path suffix and shape.
    """
    by_path = {tuple(p): (x.shape, x.sharding) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    mesh = next(iter(by_path.values()))[1].mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def pick(path, leaf):
        for i in range(len(path)):
            shape, sharding = by_path.get(tuple(path[i:]), (None, None))
            if shape == leaf.shape:
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, params))


class Steps:
    """Jitted steps, compiled once per (mode, label window): state is donated in training, never the target.

    Parameter and optimizer-state shardings are pinned as the train step's outputs, so the state
    layout cannot drift between steps; steps are traced under the parameters' mesh so the
    activation constraints apply.
    """

    def __init__(self, model, target, cfg: ExperimentConfig, forward_fn=forward):
        self.cfg = cfg
        self.forward_fn = forward_fn
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        self.target_graphdef, self.target_state = nnx.split(target)
        self.tx = make_optimizer(cfg.train)
        self.n_answer_tokens = cfg.eval.n_answer_tokens
        self.param_shardings = jax.tree.map(lambda x: x.sharding, self.params)
        self.mesh = jax.tree.leaves(self.param_shardings)[0].mesh
        self.opt_shardings = opt_state_shardings(self.tx, self.params)
        self.cache = None  # a clean_states.CleanStateCache, set by whoever knows the rows (see make_cache)

    def prepare(self, batch: dict) -> dict:
        """A host batch with the cached clean states attached when a cache is set (else unchanged)."""
        if self.cfg.intervention.anchor_prior:
            check_anchors(batch)
        return batch if self.cache is None else self.cache.attach(batch)

    def prepare_baseline(self, batch: dict) -> dict:
        """A host batch for `baseline`: with a full clean-state cache set, the base's cached hs[n] attached as
        `base_final_states`, so the baseline runs only the LM head (else unchanged)."""
        if self.cache is None or self.cache.layer is not None:
            return batch
        return {**batch, "base_final_states": self.cache.final_states(batch["base_ids"], batch["base_mask"])}

    def init_opt_state(self, params):
        """Optimizer state laid out as `opt_shardings` (moments like their parameters, scalars replicated)."""
        return jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)

    def context(self, mode: str, window: int, training: bool = False) -> StepContext:
        spec = spec_from_config(self.cfg, mode=mode, window=window, training=training)
        return StepContext(self.graphdef, self.target_graphdef, spec, self.cfg.train, self.n_answer_tokens,
                           self.forward_fn)

    @functools.cache
    def train_fn(self, window: int):
        fn = functools.partial(train_step, ctx=self.context("soft", window, training=True), tx=self.tx)
        return jax.jit(fn, donate_argnums=(0, 1), out_shardings=(self.param_shardings, self.opt_shardings, None))

    @functools.cache
    def eval_fn(self, mode: str, window: int):
        return jax.jit(functools.partial(eval_step, ctx=self.context(mode, window)))

    @functools.cache
    def eval_modes_fn(self, modes: tuple[str, ...], window: int):
        if self.forward_fn is not forward:
            raise ValueError("evaluate_modes runs HyperDAS's forward_modes; these steps run another forward")
        return jax.jit(functools.partial(eval_modes_step, ctx=self.context(modes[0], window), modes=modes))

    @functools.cache
    def baseline_fn(self, window: int):
        return jax.jit(functools.partial(baseline_step, target_graphdef=self.target_graphdef, window=window,
                                         n_answer_tokens=self.n_answer_tokens))

    # `window` defaults to label_window(labels); pass it when the batch is already on the devices.
    def train(self, params, opt_state, batch, step, rng, *, window: int | None = None):
        window = label_window(batch["labels"]) if window is None else window
        with use_mesh(self.mesh):
            return self.train_fn(window)(params, opt_state, self.target_state, batch, np.int32(step), rng)

    def evaluate(self, params, batch, mode: str = "soft", *, window: int | None = None):
        window = label_window(batch["labels"]) if window is None else window
        with use_mesh(self.mesh):
            return self.eval_fn(mode, window)(params, self.target_state, batch)

    def evaluate_modes(self, params, batch, modes, *, window: int | None = None):
        """`evaluate` in every mode of `modes` from one hypernetwork pass: mode -> {"correct", "selection"}."""
        modes = tuple(modes)
        if not modes:
            raise ValueError("evaluate_modes needs at least one mode")
        window = label_window(batch["labels"]) if window is None else window
        with use_mesh(self.mesh):
            outs = self.eval_modes_fn(modes, window)(params, self.target_state, batch)
        return {mode: outs[mode] for mode in modes}  # in the order asked (a jitted dict comes back sorted)

    def baseline(self, batch, *, window: int | None = None):
        window = label_window(batch["labels"]) if window is None else window
        with use_mesh(self.mesh):
            return self.baseline_fn(window)(self.target_state, batch)

    def model(self, params):
        """The HyperDAS module for a parameter state (for analysis outside the steps)."""
        return nnx.merge(self.graphdef, params)


class HyperDASMethod:
    """The evaluator's view of a trained HyperDAS model (the eval-step interface).

    Any method with `name`, `eval_batch(batch, mode)` and `baseline_batch(batch)` can be scored by
    hyperdas_jax.evaluate, e.g. the MDAS baseline.
    """

    name = "hyperdas"

    def __init__(self, steps: Steps, params):
        self.steps, self.params = steps, params

    def eval_batch(self, batch: dict, mode: str) -> dict:
        """{"correct": (b,) bool, "selection": (b, t_s+1, t_b) float32} as numpy."""
        out = self.steps.evaluate(self.params, self.steps.prepare(batch), mode)
        return {"correct": np.asarray(out["correct"]), "selection": np.asarray(out["selection"])}

    def eval_modes(self, batch: dict, modes) -> dict:
        """mode -> `eval_batch(batch, mode)` for every mode, from one hypernetwork pass."""
        outs = self.steps.evaluate_modes(self.params, self.steps.prepare(batch), modes)
        return {mode: {"correct": np.asarray(out["correct"]), "selection": np.asarray(out["selection"])}
                for mode, out in outs.items()}

    def baseline_batch(self, batch: dict) -> dict:
        """The no-intervention row: the target alone on the base, same labels."""
        return {"correct": np.asarray(self.steps.baseline(self.steps.prepare_baseline(batch))["correct"])}


def with_answer_tokens(method, k: int | None):
    """The method with its jitted steps rebuilt to score the first k answer tokens (a shallow copy).

    Methods built on `Steps` (HyperDAS, MDAS) are rebuilt; any other method is returned as it is
    and the evaluator checks that its k agrees.
    """
    steps = getattr(method, "steps", None)
    if steps is None or steps.n_answer_tokens == k:
        return method
    cfg = dataclasses.replace(steps.cfg, eval=dataclasses.replace(steps.cfg.eval, n_answer_tokens=k))
    target = nnx.merge(steps.target_graphdef, steps.target_state)
    rebuilt = copy.copy(method)
    rebuilt.steps = Steps(steps.model(method.params), target, cfg, forward_fn=steps.forward_fn)
    return rebuilt


def target_config(method):
    """The ModelConfig of the target a `Steps`-based method patches."""
    steps = method.steps
    return nnx.merge(steps.target_graphdef, steps.target_state).config

