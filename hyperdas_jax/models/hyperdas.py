"""The trainable HyperDAS model (editor + selection head + subspace) and its forward through the frozen target.

Target passes per step: one clean pass on the source and one on the base (hidden states only, no
LM head; none when the batch carries cached clean states, see clean_states.py), then blocks
[L, n) once more from the patched hs[L] of the clean base (blocks [0, L) of the intervened run
would recompute exactly the clean base's hs[L], §2), with logits only at the answer positions.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hyperdas_jax.config import ExperimentConfig, ModelConfig, check_fits_target
from hyperdas_jax.models.hypernet import HyperNetwork, copy_from_target, editor_config, make_memory, unit_normalise
from hyperdas_jax.models.intervention import make_subspace, mix_sources, temperature
from hyperdas_jax.models.layers import remat_module
from hyperdas_jax.models.llama import Llama
from hyperdas_jax.models.selection import anchor_prior, select, similarity_prior


MISSING_ANCHORS = ("intervention.anchor_prior needs batches collated from RAVEL rows (base_anchor_pos, "
                   "source_anchor_pos: where the instruction names the two entities)")


class HyperDAS(nnx.Module):
    """Everything HyperDAS trains: `hypernet`, `head` (selection), `subspace` (e.g. ReflectSelect)."""

    def __init__(self, target_cfg: ModelConfig, cfg: ExperimentConfig, *, rngs: nnx.Rngs):
        from hyperdas_jax.models.selection import SelectionHead

        check_fits_target(cfg, target_cfg)
        ecfg = editor_config(target_cfg, cfg.hypernet)
        iv = cfg.intervention
        rank = iv.rank
        self.hypernet = HyperNetwork(target_cfg, cfg.hypernet, rngs=rngs)
        self.head = SelectionHead(ecfg, rngs=rngs)
        hidden = iv.mlp_hidden or target_cfg.intermediate_size
        self.subspace = make_subspace(iv.subspace, ecfg, rank, hidden, reflections=iv.reflections, rngs=rngs)


def build_hyperdas(target: Llama, cfg: ExperimentConfig, *, seed: int = 0, mesh=None) -> HyperDAS:
    """A HyperDAS model for `target`, initialised from it as the config says (params born sharded)."""
    from hyperdas_jax.sharding import current_or_default_mesh, use_mesh

    def init(target):
        model = HyperDAS(target.config, cfg, rngs=nnx.Rngs(seed))
        copy_from_target(model.hypernet, target)
        return model

    # The target is an argument, not a closure: closed-over weights would be baked into the
    # program as constants (16 GB for Llama-3-8B), and across hosts they cannot be closed over at all.
    with use_mesh(current_or_default_mesh(mesh)):
        return nnx.jit(init)(target)


class Outputs(NamedTuple):
    logits: jax.Array  # (b, w, v) float32 at the last w prediction positions (w = labels window)
    labels: jax.Array  # (b, w) the labels those logits predict (-100 = none)
    selection: jax.Array  # (b, t_s+1, t_b) the A actually used (after the inference mode)
    soft_selection: jax.Array  # (b, t_s+1, t_b) the head's soft A


@dataclasses.dataclass(frozen=True)
class ForwardSpec:
    """Static choices of one compiled forward."""

    layer: int
    mode: str = "soft"
    window: int = 8  # logits are computed for the last `window` label positions only
    total_steps: int = 1
    temperature_start: float = 50.0
    temperature_end: float = 0.1
    bidding_threshold: float = 0.1
    break_asymmetric: bool = False
    remat: bool = False
    similarity_prior: float = 0.0  # scale of `selection.similarity_prior` added to the pair logits; 0 = off
    anchor_prior: float = 0.0  # scale of `selection.anchor_prior` added to the pair logits; 0 = off
    anchor_layer: int | None = None  # the states the anchor prior compares: hs[anchor_layer]; None: `layer`
    self_positions: str = "real"  # "real" or "original": see InterventionConfig.self_positions
    pair_positions: str = "rope"  # "rope" or "none": see InterventionConfig.pair_positions
    dropout: float = 0.0  # HypernetConfig.dropout; applied only where the forward gets a training step's rng
    # Training only (TrainConfig.straight_through): from step `straight_through_from` on, the first
    # round(straight_through_share·b) rows are patched with this mode's hard selection, gradients through A.
    straight_through: str | None = None
    straight_through_from: int = 0
    straight_through_share: float = 0.0


def clean_hidden_states(target: Llama, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Frozen target hidden states (n+1, b, t, d) with real tokens at positions 0, 1, ... (pads ignored)."""
    return jax.lax.stop_gradient(target.hidden_states(ids, mask))


def clean_pair(target: Llama, base_ids, base_mask, source_ids, source_mask) -> tuple[jax.Array, jax.Array]:
    """Clean states of base and source from ONE pass over both (left-padded to a common length).

    Equal to two separate passes (positions come from the masks, extra left pads are masked
    keys), but every target weight is used once per step here: with two passes an FSDP-sharded
    target's gathered weights stay alive from the first pass to the second, i.e. all of them at
    once. Returns (n+1, b, t_b, d) and (n+1, b, t_s, d).
    """
    b, tb = base_ids.shape
    ts = source_ids.shape[1]
    t = max(tb, ts)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (t - n, 0)))  # noqa: E731 - left padding, mask 0
    ids = jnp.concatenate([pad(base_ids, tb), pad(source_ids, ts)])  # (2b, t)
    mask = jnp.concatenate([pad(base_mask, tb), pad(source_mask, ts)])
    hs = clean_hidden_states(target, ids, mask)  # (n+1, 2b, t, d)
    return hs[:, :b, t - tb:], hs[:, b:, t - ts:]


class Decision(NamedTuple):
    """What the hypernetwork decides for a batch before an inference mode turns A into a hard choice."""

    soft: jax.Array  # (b, t_s+1, t_b) the head's soft A, SELF row last
    z_last: jax.Array  # (b, d) the editor's last state: conditions the subspace
    base_l: jax.Array  # (b, t_b, d) the clean base's raw residual stream entering block L
    src_l: jax.Array  # (b, t_s, d) the same for the source


def decide(model: HyperDAS, target: Llama, batch: dict, spec: ForwardSpec, step=0, rng=None) -> Decision:
    """The clean states (cached or one pass), the editor over them and the selection head's soft A."""
    L = spec.layer
    ecfg = model.hypernet.config
    if "base_states" in batch:  # cached clean states (hyperdas_jax/clean_states.py), (b, n+1, t, d)
        dtype = jnp.dtype(target.config.dtype)
        hs_base = jax.lax.stop_gradient(jnp.moveaxis(batch["base_states"], 1, 0).astype(dtype))
        hs_src = jax.lax.stop_gradient(jnp.moveaxis(batch["source_states"], 1, 0).astype(dtype))
    else:
        hs_base, hs_src = clean_pair(target, batch["base_ids"], batch["base_mask"], batch["source_ids"],
                                     batch["source_mask"])  # (n+1, b, tb, d), (n+1, b, ts, d)
    base_iv, src_iv = batch["base_intervention_mask"], batch["source_intervention_mask"]

    # Collated batches name the visible tokens, and the memories hold only those (same attention, fewer keys).
    memories = [make_memory(hs, iv, ecfg, batch.get(key)) for hs, iv, key in
                ((hs_src, src_iv, "source_memory_index"), (hs_base, base_iv, "base_memory_index"))]
    dropout_key = None if rng is None or not spec.dropout else jax.random.fold_in(rng, 1)  # training steps only
    z, pos = model.hypernet(batch["editor_ids"], batch["editor_mask"], *memories, remat=spec.remat,
                            dropout=spec.dropout, dropout_key=dropout_key)
    z_last, pos_last = z[:, -1], pos[:, -1]  # left padding: the last token is real

    swap = False
    if spec.break_asymmetric:
        key = jax.random.fold_in(rng if rng is not None else jax.random.key(0), step)
        swap = jax.random.bernoulli(key)  # one coin for the whole batch, as in the original
    priors = []  # (b, i, j) terms added to the pair logits
    if spec.similarity_prior:
        priors.append(spec.similarity_prior * similarity_prior(hs_base[L], base_iv, batch["base_mask"],
                                                               hs_src[L], src_iv, batch["source_mask"]))
    if spec.anchor_prior:
        if "base_anchor_pos" not in batch:
            raise ValueError(MISSING_ANCHORS)
        A = L if spec.anchor_layer is None else spec.anchor_layer  # the anchor states: hs[A]
        if "editor_layer_states" in batch:  # cached (clean_states.py): the same ops, run once per instruction
            editor_l = jax.lax.stop_gradient(batch["editor_layer_states"].astype(jnp.dtype(target.config.dtype)))
        else:
            editor_l = jax.lax.stop_gradient(target.residual_stream(batch["editor_ids"], batch["editor_mask"], A))
        priors.append(spec.anchor_prior * anchor_prior(
            hs_base[A], base_iv, batch["base_mask"], hs_src[A], src_iv, batch["source_mask"], editor_l,
            batch["editor_mask"], batch["base_anchor_pos"], batch["source_anchor_pos"]))
    prior = sum(priors[1:], priors[0]) if priors else None
    soft = model.head(z_last, pos_last, unit_normalise(hs_base[L]), base_iv, unit_normalise(hs_src[L]), src_iv,
                      swap=swap, base_attention_mask=batch["base_mask"] if spec.self_positions == "real" else None,
                      prior=prior, positions=spec.pair_positions)
    return Decision(soft, z_last, hs_base[L], hs_src[L])


def hard_selection(decision: Decision, batch: dict, spec: ForwardSpec, mode: str) -> jax.Array:
    """A (b, t_s+1, t_b) float32 in inference mode `mode` (selection.select on the soft A)."""
    return select(decision.soft, mode, base_entity_pos=batch.get("base_entity_pos"),
                  source_entity_pos=batch.get("source_entity_pos"), threshold=spec.bidding_threshold)


def patch(model: HyperDAS, decision: Decision, a: jax.Array, spec: ForwardSpec, step=0) -> jax.Array:
    """The base's hs[L] (b, t_b, d) with the subspace patched from the sources A mixes."""
    mixed = mix_sources(a, decision.base_l, decision.src_l)
    tau = temperature(step, spec.total_steps, spec.temperature_start, spec.temperature_end)
    return model.subspace(decision.z_last, decision.base_l, mixed, temperature=tau)


def answer_logits(target: Llama, patched: jax.Array, base_mask: jax.Array, spec: ForwardSpec) -> jax.Array:
    """Blocks [L, n) from patched residuals (b, t_b, d), then logits (b, w, v) at the last w prediction positions."""
    h = run_upper_blocks(target, patched, target.attn_inputs(base_mask), spec.layer, spec.remat)
    w = spec.window
    return target.unembed(h[:, -w - 1:-1])  # position t-1 predicts the label at t


def forward(model: HyperDAS, target: Llama, batch: dict, spec: ForwardSpec, step=0, rng=None) -> Outputs:
    """HyperDAS forward on a collated batch (see hyperdas_jax/data/collate.py for the keys and shapes)."""
    decision = decide(model, target, batch, spec, step, rng)
    a = hard_selection(decision, batch, spec, spec.mode)
    if spec.straight_through is not None:
        a = straight_through(a, select(decision.soft, spec.straight_through, threshold=spec.bidding_threshold),
                             step >= spec.straight_through_from, round(spec.straight_through_share * a.shape[0]))
    logits = answer_logits(target, patch(model, decision, a, spec, step), batch["base_mask"], spec)
    return Outputs(logits, batch["labels"][:, -spec.window:], a, decision.soft)


def forward_modes(model: HyperDAS, target: Llama, batch: dict, spec: ForwardSpec, modes: tuple[str, ...],
                  step=0) -> dict[str, Outputs]:
    """`forward` in several inference modes from one editor and selection-head pass (evaluation; no dropout).

    The modes differ only in the A they patch with, so the hypernetwork runs once and the patched
    residuals of all modes go through blocks [L, n) as one batch of b·m rows, interleaved
    example-major ((b, m) -> b·m) so a batch-sharded row never leaves its device; those blocks hold
    m times one mode's activations (no backward pass keeps them). Each mode's outputs equal `forward`
    with `spec.mode` set to it, up to float rounding (tests/test_hyperdas.py).
    """
    if not modes:
        raise ValueError("forward_modes needs at least one mode")
    decision = decide(model, target, batch, spec, step)
    chosen = [hard_selection(decision, batch, spec, mode) for mode in modes]  # m × (b, i+1, j)
    patched = jnp.stack([patch(model, decision, a, spec, step) for a in chosen], axis=1)  # (b, m, j, d)
    b, m = patched.shape[:2]
    mask = jnp.repeat(batch["base_mask"], m, axis=0)  # (b·m, j), row r is example r // m
    logits = answer_logits(target, patched.reshape(b * m, *patched.shape[2:]), mask, spec)  # (b·m, w, v)
    logits = logits.reshape(b, m, *logits.shape[1:])
    labels = batch["labels"][:, -spec.window:]
    return {mode: Outputs(logits[:, i], labels, a, decision.soft) for i, (mode, a) in enumerate(zip(modes, chosen))}


def straight_through(a: jax.Array, hard: jax.Array, on, rows: int) -> jax.Array:
    """`hard` in the forward pass for the first `rows` examples once `on`, with the gradient of `a`.

    a, hard: (b, i+1, j); on: a bool scalar (may be traced). Returns (b, i+1, j): a + stop_gradient(hard − a)
    on the chosen rows, `a` itself elsewhere.
    """
    chosen = (jnp.arange(a.shape[0]) < rows)[:, None, None] & on  # (b, 1, 1)
    return a + jax.lax.stop_gradient(jnp.where(chosen, hard - a, 0.0))


def run_upper_blocks(target: Llama, h: jax.Array, attn, start: int, remat: bool) -> jax.Array:
    """Blocks [start, n) of the frozen target; with `remat` each block is recomputed in the backward pass."""
    if not remat:
        return target.run_layers(h, attn, start)
    for layer in target.layers[start:]:
        h = remat_module(layer)(h, attn)  # also keeps the clean pass's gathered weights from being reused here
    return h
