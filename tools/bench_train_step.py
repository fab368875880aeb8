"""Benchmark one HyperDAS train step on SmolLM2 against this machine's float32 matmul peak.

  python -m tools.bench_train_step                       # B=16, ~32-token prompts, N=2, L=15, k=128
  python -m tools.bench_train_step --set train.batch_size=8 --runs 5

FLOPs are counted analytically from the matmuls (2·m·n·k each; elementwise work, softmax and norms
are not counted): the two clean target passes (forward only, no LM head), blocks [L, n) and the
LM head at the label window (forward + input-gradient backward, no weight gradients: the target is
frozen), and the hypernetwork, selection head and subspace (forward + input and weight gradients =
3x forward).
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import statistics
import sys
import time

import numpy as np


def matmul_peak(n: int = 2048, runs: int = 5) -> float:
    """Measured float32 FLOP/s of one jitted n×n×n matmul (median)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def step_flops(t, cfg, b: int, te: int, tb: int, ts: int, window: int) -> dict[str, float]:
    """Analytic matmul FLOPs of one train step, by component."""
    d, n, nk, h, f, v = (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
                         t.intermediate_size, t.vocab_size)
    layers, L = t.num_hidden_layers, cfg.intervention.layer
    proj = 2 * d * (2 * n * h + 2 * nk * h)  # q, o + k, v per token
    mlp = 2 * 3 * d * f

    def block(tokens, seq):  # forward FLOPs of one block over `tokens` rows of length `seq`
        return tokens * (proj + mlp + 2 * 2 * seq * n * h)

    out = {}
    out["target clean passes (fwd)"] = layers * (block(b * tb, tb) + block(b * ts, ts))
    out["target blocks [L,n) + head (fwd+bwd)"] = 2 * ((layers - L) * block(b * tb, tb) + 2 * b * window * d * v)
    mem_b, mem_s = tb * (layers + 1), ts * (layers + 1)
    hyper = 0
    for mem in (mem_s, mem_b):  # cross-attention: q, o on the editor; k, v on the memory
        hyper += b * (te * 2 * d * 2 * n * h + mem * 2 * d * 2 * nk * h + 2 * 2 * te * mem * n * h)
    hyper += block(b * te, te)
    out["hypernetwork (fwd+bwd)"] = 3 * cfg.hypernet.num_layers * hyper
    head = b * (2 * d * d * (tb + ts) + 2 * d * nk * h * (2 * tb + ts) + 2 * d * n * h)
    hidden = cfg.intervention.mlp_hidden or f
    sub = b * (2 * 3 * d * hidden + 2 * 2 * tb * d * cfg.intervention.rank)
    out["selection head + subspace (fwd+bwd)"] = 3 * (head + sub)
    return out


def synthetic_batch(rng, b, te, tb, ts, vocab, answer=3):
    """Full-length random prompts with a 3-token answer: the shapes a RAVEL city batch has."""
    batch = {
        "editor_ids": rng.integers(3, vocab, (b, te)).astype(np.int32),
        "editor_mask": np.ones((b, te), np.int32),
        "base_ids": rng.integers(3, vocab, (b, tb)).astype(np.int32),
        "base_mask": np.ones((b, tb), np.int32),
        "source_ids": rng.integers(3, vocab, (b, ts)).astype(np.int32),
        "source_mask": np.ones((b, ts), np.int32),
    }
    batch["base_intervention_mask"] = np.concatenate([np.ones((b, tb - answer - 3)), np.zeros((b, answer + 3))], 1)
    batch["source_intervention_mask"] = np.concatenate([np.ones((b, ts - 4)), np.zeros((b, 4))], 1)
    batch["base_intervention_mask"] = batch["base_intervention_mask"].astype(np.int32)
    batch["source_intervention_mask"] = batch["source_intervention_mask"].astype(np.int32)
    labels = np.full((b, tb), -100, np.int32)
    labels[:, -answer:] = batch["base_ids"][:, -answer:]
    batch["labels"] = labels
    batch["base_entity_pos"] = np.full(b, tb - answer - 4, np.int32)
    batch["source_entity_pos"] = np.full(b, ts - 5, np.int32)
    batch["is_causal"] = np.arange(b) % 2 == 0
    batch["valid"] = np.ones(b, bool)
    batch["row_index"] = np.arange(b, dtype=np.int32)
    return batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_ravel.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--runs", type=int, default=10, help="timed steps after warm-up (median reported)")
    parser.add_argument("--tokens", default="16,32,32", help="editor,base,source lengths")
    args = parser.parse_args(argv)

    import jax

    from hyperdas_jax.config import load_config
    from hyperdas_jax.models.hyperdas import build_hyperdas
    from hyperdas_jax.target import load_target
    from hyperdas_jax.train import Steps, label_window

    cfg = load_config(args.config, args.set)
    if cfg.target.path is None:  # a random target (configs/tiny.yaml)
        from flax import nnx

        from hyperdas_jax.models.llama import Llama
        from hyperdas_jax.sharding import create_sharded
        from hyperdas_jax.target import Target

        target = Target(create_sharded(lambda: Llama(cfg.target.random, rngs=nnx.Rngs(0))))
    else:
        path = pathlib.Path(cfg.target.path)
        if not (path / "model_config.json").is_file():
            from tools.main_job import ensure_smollm2

            ensure_smollm2(path)
        target = load_target(path, dtype=cfg.target.dtype)
    te, tb, ts = (int(x) for x in args.tokens.split(","))
    b = cfg.train.batch_size
    model = build_hyperdas(target.model, cfg)
    steps = Steps(model, target.model, cfg)
    batch = synthetic_batch(np.random.default_rng(0), b, te, tb, ts, target.config.vocab_size)
    from hyperdas_jax.clean_states import CleanStateCache

    cache = CleanStateCache(steps.target_graphdef, steps.target_state)
    cache.attach(batch)  # filled once, as a run fills it before training
    key = jax.random.key(0)
    initial = steps.params

    def timed(prepare):
        """(compile s, median step s) of the train step; `prepare` runs inside every timed step."""
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
        for i in range(args.runs):
            t = time.perf_counter()
            params, opt, m = steps.train(params, opt, prepare(batch), i + 3, key)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        return compile_s, statistics.median(times)

    compile_s, step_s = timed(lambda x: x)
    _, cached_s = timed(cache.attach)
    flops = step_flops(target.config, cfg, b, te, tb, ts, label_window(batch["labels"]))
    total = sum(flops.values())
    peak = matmul_peak()
    L, n = cfg.intervention.layer, target.config.num_hidden_layers

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; "
          f"config {args.config} {' '.join(args.set)}")
    print(f"batch {b}, editor/base/source tokens {te}/{tb}/{ts}, N={cfg.hypernet.num_layers}, L={L}, "
          f"k={cfg.intervention.rank}, dtype {cfg.target.dtype}; first step (compile) {compile_s:.1f}s\n")
    print("| component | GFLOP/step |\n|---|---:|")
    for name, value in flops.items():
        print(f"| {name} | {value / 1e9:.2f} |")
    print(f"| **total** | **{total / 1e9:.2f}** |\n")
    print("| metric | value |\n|---|---:|")
    print(f"| median step time (ms, {args.runs} runs) | {step_s * 1e3:.1f} |")
    print(f"| examples/s | {b / step_s:.1f} |")
    print(f"| target passes per step | 2 clean + {n - L}/{n} blocks with gradient = {2 + (n - L) / n:.2f} |")
    print(f"| achieved GFLOP/s | {total / step_s / 1e9:.1f} |")
    print(f"| float32 matmul peak (2048^3, jitted) GFLOP/s | {peak / 1e9:.1f} |")
    print(f"| fraction of peak | {total / step_s / peak:.1%} |")
    cached_flops = total - flops["target clean passes (fwd)"]
    print(f"| median step time with cached clean states (ms) | {cached_s * 1e3:.1f} |")
    print(f"| cached step speed-up (same run) | {step_s / cached_s:.2f}x |")
    print(f"| cached step GFLOP/s ({cached_flops / 1e9:.1f} GFLOP/step) | {cached_flops / cached_s / 1e9:.1f} |")
    print(f"| peak RSS (GiB) | {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
