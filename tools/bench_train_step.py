"""Benchmark one HyperDAS train step on SmolLM2: FLOPs against this machine's matmul peak, the cached
step, and the original PyTorch implementation's step (hyperdas_jax/benchmarks/train_step.py).

  python -m tools.bench_train_step                       # B=16, ~32-token prompts, N=2, L=15, k=128
  python -m tools.bench_train_step --set train.batch_size=8 --runs 5
  python -m tools.bench_train_step --tokens 16,48,48 --visible 26,28 --no-torch   # padded like a city batch
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import sys

import numpy as np

from hyperdas_jax.benchmarks import train_step as bench
from hyperdas_jax.benchmarks.flops import xla_matmul_peak
from tools.cli import positive_int


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2_ravel.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--runs", type=positive_int, default=10, help="timed steps after warm-up (median reported)")
    parser.add_argument("--tokens", default="16,32,32", help="editor,base,source lengths")
    parser.add_argument("--visible", default=None,
                        help="base,source tokens the hypernetwork sees, the prompts left-padded to --tokens "
                             "(default: full-length prompts)")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers-torch comparison")
    args = parser.parse_args(argv)

    import jax

    from hyperdas_jax.clean_states import CleanStateCache
    from hyperdas_jax.compute_dtype import describe
    from hyperdas_jax.config import load_config
    from hyperdas_jax.models.hyperdas import build_hyperdas
    from hyperdas_jax.pipeline.main_job import ensure_smollm2
    from hyperdas_jax.target import Target, build_target
    from hyperdas_jax.train import Steps, label_window

    cfg = load_config(args.config, args.set)
    if cfg.target.path:
        ensure_smollm2(pathlib.Path(cfg.target.path))  # the default config's embedded target, converted once
    target = Target(build_target(cfg, None))
    te, tb, ts = (int(x) for x in args.tokens.split(","))
    visible = None if args.visible is None else tuple(int(x) for x in args.visible.split(","))
    b = cfg.train.batch_size
    steps = Steps(build_hyperdas(target.model, cfg), target.model, cfg)
    batch = bench.synthetic_batch(np.random.default_rng(0), b, te, tb, ts, target.config.vocab_size, visible=visible)
    widths = (batch["base_memory_index"].shape[1], batch["source_memory_index"].shape[1])
    iv = cfg.intervention
    cache = CleanStateCache(steps.target_graphdef, steps.target_state,  # as make_cache builds a run's
                            instruction_layer=iv.anchor_states_layer if iv.anchor_prior else None)
    cache.attach(batch)  # filled once, as a run fills it before training
    key = jax.random.key(0)
    compile_s, step_s = bench.time_step(steps, steps.params, batch, lambda x: x, key, args.runs)
    _, cached_s = bench.time_step(steps, steps.params, batch, cache.attach, key, args.runs)
    full_memory_s = None
    if widths != (tb, ts):  # the same step with memories of every position, as before `*_memory_index`
        full = {k: v for k, v in batch.items() if not k.endswith("_memory_index")}
        _, full_memory_s = bench.time_step(steps, steps.params, full, cache.attach, key, args.runs)
    flops = bench.step_flops(target.config, cfg, b, te, tb, ts, label_window(batch["labels"]), memory=widths)
    compute = target.config.dtype  # resolved: `auto` is float32 or bfloat16 here
    total, peak = sum(flops.values()), xla_matmul_peak(compute)
    L, n = cfg.intervention.layer, target.config.num_hidden_layers
    on_cpu = jax.devices()[0].platform == "cpu"
    forward = bench.original_forwards(pathlib.Path(cfg.target.path), args.runs) if cfg.target.path and on_cpu \
        and not args.no_torch else {}

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({bench.cpu_kind() or 'cpu kind unknown'}), "
          f"jax {jax.__version__}; config {args.config} {' '.join(args.set)}")
    print(f"batch {b}, editor/base/source tokens {te}/{tb}/{ts} (memories of {widths[0]}/{widths[1]} visible), "
          f"N={cfg.hypernet.num_layers}, L={L}, "
          f"k={cfg.intervention.rank}, dtype {describe(cfg.target.dtype)}; first step (compile) {compile_s:.1f}s\n")
    print("| component | GFLOP/step |\n|---|---:|")
    print("\n".join(f"| {name} | {value / 1e9:.2f} |" for name, value in flops.items()))
    print(f"| **total** | **{total / 1e9:.2f}** |\n")
    cached_flops = total - sum(flops.get(k, 0.0) for k in bench.CACHED)
    rows = [(f"median step time (ms, {args.runs} runs)", f"{step_s * 1e3:.1f}"), ("examples/s", f"{b / step_s:.1f}"),
            ("target passes per step", f"2 clean + {n - L}/{n} blocks with gradient = {2 + (n - L) / n:.2f}"),
            ("achieved GFLOP/s", f"{total / step_s / 1e9:.1f}"),
            (f"{compute} matmul peak (2048^3, jitted, the target's compute dtype) GFLOP/s", f"{peak / 1e9:.1f}"),
            ("fraction of peak", f"{total / step_s / peak:.1%}"),
            ("median step time with cached clean states (ms)", f"{cached_s * 1e3:.1f}"),
            ("cached step speed-up (same run)", f"{step_s / cached_s:.2f}x"),
            (f"cached step GFLOP/s ({cached_flops / 1e9:.1f} GFLOP/step)", f"{cached_flops / cached_s / 1e9:.1f}")]
    if full_memory_s is not None:
        rows += [(f"cached step, memories of all {tb}/{ts} positions (ms)", f"{full_memory_s * 1e3:.1f}"),
                 ("visible-token memories speed-up (same run)", f"{full_memory_s / cached_s:.2f}x")]
    shape = "x".join(map(str, bench.TORCH_FORWARD_SHAPE))
    rows += [(f"transformers-torch forward {dtype} ({shape}, full logits, 2 threads) (ms)", f"{s * 1e3:.1f}")
             for dtype, s in forward.items()]
    names = {"float32": "the original's fp32 step", "bfloat16": "its bf16 step"}
    rows += [(f"cached step, x {names[dtype]} (speed, {bench.ORIGINAL_STEP_FORWARDS[bench.cpu_kind()][dtype]} "
              "torch forwards)", f"{ratio:.2f}x")
             for dtype, ratio in bench.original_multiples(cached_s, forward, bench.cpu_kind()).items()]
    rows.append(("peak RSS (GiB)", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}"))
    print("| metric | value |\n|---|---:|")
    print("\n".join(f"| {name} | {value} |" for name, value in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
