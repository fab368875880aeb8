"""One HyperDAS train step timed against this machine's matmul peak and against the original
PyTorch implementation's step (tools/bench_train_step.py).

FLOPs are counted analytically from the matmuls (2·m·n·k each; elementwise work, softmax and norms
are not counted): the two clean target passes (forward only, no LM head), blocks [L, n) and the
LM head at the label window (forward + input-gradient backward, no weight gradients: the target is
frozen), and the hypernetwork, selection head and subspace (forward + input and weight gradients =
3x forward).

The original's step is not run here (it needs the original repository); it was measured once per
machine kind in plain transformers-torch forwards of the same target at batch 16 x 33 tokens with
full logits and 2 threads, `ORIGINAL_STEP_FORWARDS`. The benchmark times that forward in the same
run as our step and reports our step as a multiple of the original's.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from hyperdas_jax.benchmarks.flops import block_flops, median_seconds
from hyperdas_jax.data.collate import DEFAULT_LENGTH_BUCKETS, visible_index

# The original HyperDAS train step (SmolLM2, B=16, N=2, L=15, k=128) in units of one
# transformers-torch SmolLM2 forward (batch 16 x 33 tokens, full logits, 2 threads), measured side
# by side on each machine kind of this project (float32 / bfloat16 step and forward).
ORIGINAL_STEP_FORWARDS = {"intel": {"float32": 7.7, "bfloat16": 9.5}, "amd": {"float32": 6.7, "bfloat16": 7.6}}
TORCH_FORWARD_SHAPE = (16, 33)


def cpu_kind() -> str | None:
    """"intel" or "amd" from /proc/cpuinfo's vendor (None elsewhere)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    if "GenuineIntel" in text:
        return "intel"
    if "AuthenticAMD" in text:
        return "amd"
    return None


def torch_forward_s(model, dtype: str, *, runs: int = 5, shape=TORCH_FORWARD_SHAPE, seed: int = 0) -> float:
    """Median seconds of one transformers-torch forward with full logits at `shape` (batch, tokens),
    the model cast to `dtype` ("float32" or "bfloat16") for the measurement and back after."""
    import torch

    b, t = shape
    ids = torch.from_numpy(np.random.default_rng(seed).integers(3, model.config.vocab_size, (b, t)))
    mask = torch.ones_like(ids)
    model.to(getattr(torch, dtype))
    try:
        with torch.inference_mode():
            return median_seconds(lambda: model(input_ids=ids, attention_mask=mask).logits.float(), runs, warmup=2)
    finally:
        model.to(torch.float32)


def original_forwards(target_dir, runs: int) -> dict[str, float]:
    """Median seconds of the transformers-torch forward the original's step is counted in, float32 and
    bfloat16, on the model `target_dir` was converted from, with 2 threads (as the factors were measured)."""
    import torch

    from hyperdas_jax.benchmarks.forward import load_torch

    torch.set_num_threads(2)
    model = load_torch(target_dir, "sdpa")
    return {dtype: torch_forward_s(model, dtype, runs=runs) for dtype in ("float32", "bfloat16")}


def original_multiples(step_s: float, forward_s: dict[str, float], kind: str | None) -> dict[str, float]:
    """Our step as a multiple of the original's per dtype: (factor x forward) / our step; empty when
    the machine kind has no measured factors."""
    factors = ORIGINAL_STEP_FORWARDS.get(kind or "", {})
    return {dtype: factors[dtype] * seconds / step_s for dtype, seconds in forward_s.items() if dtype in factors}


def time_step(steps, initial, batch, prepare, key, runs: int) -> tuple[float, float]:
    """(compile s, median step s) of the train step from `initial` parameters; `prepare` runs inside
    every timed step (e.g. attaching cached clean states)."""
    import jax

    params = jax.tree.map(lambda x: x.copy(), initial)  # the step donates its state
    opt = steps.init_opt_state(params)
    t0 = time.perf_counter()
    params, opt, m = steps.train(params, opt, prepare(batch), 0, key)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for i in range(2):
        params, opt, m = steps.train(params, opt, prepare(batch), i + 1, key)
    jax.block_until_ready(m)
    times = []
    for i in range(runs):
        t = time.perf_counter()
        params, opt, m = steps.train(params, opt, prepare(batch), i + 3, key)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return compile_s, statistics.median(times)


INSTRUCTION_PASS = "target instruction pass, anchor prior (fwd)"
CACHED = ("target clean passes (fwd)", INSTRUCTION_PASS)  # what a step with the clean-state cache skips


def step_flops(t, cfg, b: int, te: int, tb: int, ts: int, window: int,
               memory: tuple[int, int] | None = None) -> dict[str, float]:
    """Analytic matmul FLOPs of one train step, by component; `memory`: the tokens the hypernetwork's
    base and source memories hold (default tb, ts)."""
    d, n, nk, h, f, v = (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
                         t.intermediate_size, t.vocab_size)
    layers, L = t.num_hidden_layers, cfg.intervention.layer
    out = {}
    out["target clean passes (fwd)"] = layers * (block_flops(t, b * tb, tb) + block_flops(t, b * ts, ts))
    if cfg.intervention.anchor_prior:  # blocks [0, A) over the instruction (cached with the clean states)
        out[INSTRUCTION_PASS] = cfg.intervention.anchor_states_layer * block_flops(t, b * te, te)
    out["target blocks [L,n) + head (fwd+bwd)"] = 2 * ((layers - L) * block_flops(t, b * tb, tb)
                                                      + 2 * b * window * d * v)
    mem_b, mem_s = ((layers + 1) * w for w in (memory or (tb, ts)))
    hyper = 0
    for mem in (mem_s, mem_b):  # cross-attention: q, o on the editor; k, v on the memory
        hyper += b * (te * 2 * d * 2 * n * h + mem * 2 * d * 2 * nk * h + 2 * 2 * te * mem * n * h)
    hyper += block_flops(t, b * te, te)
    out["hypernetwork (fwd+bwd)"] = 3 * cfg.hypernet.num_layers * hyper
    head = b * (2 * d * d * (tb + ts) + 2 * d * nk * h * (2 * tb + ts) + 2 * d * n * h)
    hidden = cfg.intervention.mlp_hidden or f
    m = cfg.intervention.reflections  # rv_proj's output is m·d; each reflection is two (tb, d) dot products
    sub = b * (2 * (2 + m) * d * hidden + 2 * 2 * tb * d * cfg.intervention.rank + 2 * 2 * 2 * m * tb * d)
    out["selection head + subspace (fwd+bwd)"] = 3 * (head + sub)
    return out


def synthetic_batch(rng, b, te, tb, ts, vocab, answer=3, visible=None):
    """Random prompts with a 3-token answer: the shapes a RAVEL city batch has.

    `visible` (base, source): how many tokens of each prompt the hypernetwork sees; the prompts are
    then that long plus their hidden suffix (3 tokens + the answer for the base, 4 for the source),
    left-padded to tb / ts as collated batches are. None: full-length prompts (tb - answer - 3 and
    ts - 4 visible).
    """
    vb, vs = visible if visible is not None else (tb - answer - 3, ts - 4)
    if not (1 <= vb <= tb - answer - 3 and 1 <= vs <= ts - 4):
        raise ValueError(f"visible {vb},{vs} must be in [1, {tb - answer - 3}] and [1, {ts - 4}] for lengths {tb},{ts}")
    pos_b, pos_s = np.arange(tb)[None], np.arange(ts)[None]
    start_b, start_s = tb - (vb + answer + 3), ts - (vs + 4)  # first real position
    batch = {
        "editor_ids": rng.integers(3, vocab, (b, te)).astype(np.int32),
        "editor_mask": np.ones((b, te), np.int32),
        "base_ids": rng.integers(3, vocab, (b, tb)).astype(np.int32),
        "base_mask": np.repeat(pos_b >= start_b, b, 0).astype(np.int32),
        "source_ids": rng.integers(3, vocab, (b, ts)).astype(np.int32),
        "source_mask": np.repeat(pos_s >= start_s, b, 0).astype(np.int32),
    }
    batch["base_intervention_mask"] = np.repeat((pos_b >= start_b) & (pos_b < start_b + vb), b, 0).astype(np.int32)
    batch["source_intervention_mask"] = np.repeat((pos_s >= start_s) & (pos_s < start_s + vs), b, 0).astype(np.int32)
    labels = np.full((b, tb), -100, np.int32)
    labels[:, -answer:] = batch["base_ids"][:, -answer:]
    batch["labels"] = labels
    batch["base_entity_pos"] = np.full(b, start_b + vb - 1, np.int32)
    batch["source_entity_pos"] = np.full(b, start_s + vs - 1, np.int32)
    batch["base_anchor_pos"] = np.full(b, te // 2 - 1, np.int32)  # where an instruction would name the entities
    batch["source_anchor_pos"] = np.full(b, te - 3, np.int32)
    batch["is_causal"] = np.arange(b) % 2 == 0
    batch["valid"] = np.ones(b, bool)
    batch["row_index"] = np.arange(b, dtype=np.int32)
    for side in ("base", "source"):  # as collate_batch names them
        batch[f"{side}_memory_index"] = visible_index(batch[f"{side}_intervention_mask"], DEFAULT_LENGTH_BUCKETS)
    return batch
