"""Our jitted forward (logits and hidden-states-only) timed against transformers' torch forward
(tools/bench_forward.py)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import platform
import statistics
import time

import numpy as np

from hyperdas_jax.benchmarks.flops import PEAK_SIZE, ceiling, forward_flops, torch_matmul_peak, xla_matmul_peak

MODES = ("logits", "hidden states only")
WARMUP_CALLS = 2


def torch_source(target_dir: pathlib.Path) -> tuple[str, str | None]:
    """(folder, gguf file name or None) for transformers' from_pretrained, from the target's provenance."""
    from hyperdas_jax.convert.gguf_llama import find_smollm2_gguf

    info_file = target_dir / "conversion.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    source = pathlib.Path(info["source"]) if info.get("source") else find_smollm2_gguf()
    if info.get("kind", "gguf") == "gguf" or source.suffix == ".gguf":
        return str(source.parent), source.name
    return str(source), None


def load_torch(target_dir: pathlib.Path, attn: str):
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    folder, gguf_file = torch_source(target_dir)
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn, **kw)
    return model.eval()


def timed(fn) -> tuple[float, object]:
    """(milliseconds, result) of one call; fn must block until its result is ready."""
    start = time.perf_counter()
    out = fn()
    return (time.perf_counter() - start) * 1e3, out


def max_abs_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Max |ours - theirs|, one leading slice at a time so no full-size temporaries are made."""
    if ours.shape != theirs.shape:
        raise ValueError(f"output shapes differ: ours {ours.shape}, torch {theirs.shape}")
    return max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs))


def bench(target_dir: pathlib.Path, shapes, runs: int, torch_attns: list[str], seed: int, log,
          dtype: str = "float32") -> list[dict]:
    """One row per mode, shape and torch attention: median ms of both sides and their max-abs output difference.

    The torch reference is the model the target was converted from (its conversion.json). Both
    sides hold their weights and compute in `dtype` ("float32" or "bfloat16"; logits are float32
    on both). Each side is warmed up (compile + 2 calls), then ours and torch alternate call by
    call so that a busy spell on the machine lands on both.
    """
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from hyperdas_jax.target import restore_model

    ours = restore_model(target_dir, dtype=dtype, param_dtype=dtype)
    config, (graphdef, state) = ours.config, nnx.split(ours)  # minus the tokenizer
    del ours
    ours_fns = {
        "logits": jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask)),
        "hidden states only": jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state).hidden_states(ids, mask)),
    }
    model = load_torch(target_dir, torch_attns[0]).to(getattr(torch, dtype))
    vocab = model.config.vocab_size

    def torch_fn(mode, ids, mask):
        with torch.inference_mode():
            if mode == "logits":
                return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            out = model.model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
            return torch.stack(out.hidden_states)

    peaks = {"xla_peak": xla_matmul_peak(dtype), "torch_peak": torch_matmul_peak(dtype)}
    log(f"  {dtype} {PEAK_SIZE}^3 matmul: XLA {peaks['xla_peak'] / 1e9:.0f} GFLOP/s, "
        f"torch {peaks['torch_peak'] / 1e9:.0f} GFLOP/s")
    rng = np.random.default_rng(seed)
    rows = []
    for b, t in shapes:
        ids_np = rng.integers(0, vocab, size=(b, t), dtype=np.int64)
        ids_j, mask_j = jnp.asarray(ids_np, jnp.int32), jnp.ones((b, t), jnp.int32)
        ids_t, mask_t = torch.from_numpy(ids_np), torch.ones((b, t), dtype=torch.int64)
        for mode in MODES:
            fn = ours_fns[mode]
            compile_ms, ours_out = timed(lambda: fn(state, ids_j, mask_j).block_until_ready())
            for _ in range(WARMUP_CALLS):
                fn(state, ids_j, mask_j).block_until_ready()
            ours_out = np.asarray(ours_out, np.float32)
            diffs = {}
            for attn in torch_attns:
                model.set_attn_implementation(attn)
                theirs = torch_fn(mode, ids_t, mask_t)
                for _ in range(WARMUP_CALLS):
                    torch_fn(mode, ids_t, mask_t)
                diffs[attn] = max_abs_diff(ours_out, theirs.float().numpy())
                del theirs
            del ours_out
            ours_ms, torch_ms = [], {attn: [] for attn in torch_attns}
            for _ in range(runs):
                ours_ms.append(timed(lambda: fn(state, ids_j, mask_j).block_until_ready())[0])
                for attn in torch_attns:
                    model.set_attn_implementation(attn)
                    torch_ms[attn].append(timed(lambda: torch_fn(mode, ids_t, mask_t))[0])
            for attn in torch_attns:
                rows.append(dict(mode=mode, dtype=dtype, batch=b, tokens=t, attn=attn, ours_ms=statistics.median(ours_ms),
                                 torch_ms=statistics.median(torch_ms[attn]), diff=diffs[attn],
                                 flops=forward_flops(config, b, t, logits=mode == "logits"), **peaks))
            log(f"  {mode} {b}x{t}: first call incl. compile {compile_ms / 1e3:.1f} s, "
                f"programs compiled so far {getattr(fn, '_cache_size', lambda: '?')()}")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| mode | dtype | batch×tokens | torch attn | ours ms (median) | torch ms (median) | ours tokens/s "
             "| torch tokens/s | speed-up (torch/ours) | max abs diff | GFLOP | ours % of XLA peak "
             "| torch % of torch peak | ceiling |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n = r["batch"] * r["tokens"]
        ours_rate, torch_rate = r["flops"] / r["ours_ms"] * 1e3, r["flops"] / r["torch_ms"] * 1e3
        lines.append(f"| {r['mode']} | {r['dtype']} | {r['batch']}×{r['tokens']} | {r['attn']} | {r['ours_ms']:.2f} "
                     f"| {r['torch_ms']:.2f} | {n / r['ours_ms'] * 1e3:,.0f} | {n / r['torch_ms'] * 1e3:,.0f} "
                     f"| {r['torch_ms'] / r['ours_ms']:.2f}x | {r['diff']:.2e} | {r['flops'] / 1e9:.2f} "
                     f"| {ours_rate / r['xla_peak']:.0%} | {torch_rate / r['torch_peak']:.0%} "
                     f"| {ceiling(r['torch_ms'] / 1e3, r['flops'], r['xla_peak']):.2f}x |")
    return "\n".join(lines)


def header(runs: int, load: tuple[float, float]) -> str:
    import jax
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dev = jax.devices()[0]
    return (f"device: jax {dev.platform} ({len(jax.devices())} device(s)), {cpu}, {os.cpu_count()} cores | "
            f"jax {jax.__version__}, torch {torch.__version__} | torch threads {torch.get_num_threads()} | "
            f"median of {runs} runs after compile + {WARMUP_CALLS} warm-up calls | "
            f"1-min load average {load[0]:.1f} before, {load[1]:.1f} after")
