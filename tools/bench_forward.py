"""Time our jitted float32 forward (logits and hidden-states-only) against transformers' torch forward.

  python -m tools.bench_forward                       # checkpoints/smollm2, or a fresh conversion
  python -m tools.bench_forward --target checkpoints/smollm2 --runs 20 --shapes 8x16,32x32 --torch-attn eager
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_TARGET = REPO / "checkpoints" / "smollm2"
MODES = ("logits", "hidden states only")
WARMUP_CALLS = 2


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'8x16,32x32' -> [(8, 16), (32, 32)] (batch, tokens)."""
    shapes = []
    for item in text.split(","):
        try:
            b, t = (int(x) for x in item.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: expected BATCHxTOKENS, e.g. 8x16") from None
        if b < 1 or t < 1:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: sizes must be positive")
        shapes.append((b, t))
    return shapes


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


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


def bench(target_dir: pathlib.Path, shapes, runs: int, torch_attns: list[str], seed: int, log) -> list[dict]:
    """One row per mode, shape and torch attention: median ms of both sides and their max-abs output difference.

    The torch reference is the model the target was converted from (its conversion.json), in
    float32. Each side is warmed up (compile + 2 calls), then ours and torch alternate call by
    call so that a busy spell on the machine lands on both.
    """
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from hyperdas_jax.target import restore_model

    graphdef, state = nnx.split(restore_model(target_dir))  # load_target minus the tokenizer
    ours_fns = {
        "logits": jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask)),
        "hidden states only": jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state).hidden_states(ids, mask)),
    }
    model = load_torch(target_dir, torch_attns[0])
    vocab = model.config.vocab_size

    def torch_fn(mode, ids, mask):
        with torch.inference_mode():
            if mode == "logits":
                return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            out = model.model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
            return torch.stack(out.hidden_states)

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
            ours_out = np.asarray(ours_out)
            diffs = {}
            for attn in torch_attns:
                model.set_attn_implementation(attn)
                theirs = torch_fn(mode, ids_t, mask_t)
                for _ in range(WARMUP_CALLS):
                    torch_fn(mode, ids_t, mask_t)
                diffs[attn] = max_abs_diff(ours_out, theirs.numpy())
                del theirs
            del ours_out
            ours_ms, torch_ms = [], {attn: [] for attn in torch_attns}
            for _ in range(runs):
                ours_ms.append(timed(lambda: fn(state, ids_j, mask_j).block_until_ready())[0])
                for attn in torch_attns:
                    model.set_attn_implementation(attn)
                    torch_ms[attn].append(timed(lambda: torch_fn(mode, ids_t, mask_t))[0])
            for attn in torch_attns:
                rows.append(dict(mode=mode, batch=b, tokens=t, attn=attn, ours_ms=statistics.median(ours_ms),
                                 torch_ms=statistics.median(torch_ms[attn]), diff=diffs[attn]))
            log(f"  {mode} {b}x{t}: first call incl. compile {compile_ms / 1e3:.1f} s, "
                f"programs compiled so far {getattr(fn, '_cache_size', lambda: '?')()}")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| mode | batch×tokens | torch attn | ours ms (median) | torch ms (median) | ours tokens/s "
             "| torch tokens/s | speed-up (torch/ours) | max abs diff |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n = r["batch"] * r["tokens"]
        lines.append(f"| {r['mode']} | {r['batch']}×{r['tokens']} | {r['attn']} | {r['ours_ms']:.2f} "
                     f"| {r['torch_ms']:.2f} | {n / r['ours_ms'] * 1e3:,.0f} | {n / r['torch_ms'] * 1e3:,.0f} "
                     f"| {r['torch_ms'] / r['ours_ms']:.2f}x | {r['diff']:.2e} |")
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
            f"float32 | median of {runs} runs after compile + {WARMUP_CALLS} warm-up calls | "
            f"1-min load average {load[0]:.1f} before, {load[1]:.1f} after")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help=f"converted target directory (default: {DEFAULT_TARGET}, "
                                         "or SmolLM2 converted into a temp dir when that is missing)")
    parser.add_argument("--runs", type=positive_int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes("8x16,32x32"),
                        help="comma-separated BATCHxTOKENS list (default 8x16,32x32)")
    parser.add_argument("--torch-attn", choices=("sdpa", "eager"), default="sdpa",
                        help="sdpa (torch's default) is always timed; 'eager' times eager attention as well")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random token ids")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch_attns = ["sdpa"] if args.torch_attn == "sdpa" else ["sdpa", "eager"]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_forward-") as tmp:
        if args.target:
            target_dir = pathlib.Path(args.target)
        elif DEFAULT_TARGET.is_dir():
            target_dir = DEFAULT_TARGET
            print(f"target: {target_dir}")
        else:
            from tools import convert_hf_llama

            target_dir = pathlib.Path(tmp) / "smollm2"
            print(f"target: {DEFAULT_TARGET} missing; converting SmolLM2 into temporary {target_dir}")
            if convert_hf_llama.main(["--source", "smollm2", "--out", str(target_dir)]) != 0:
                return 1
        from hyperdas_jax.convert.errors import ConversionError
        from hyperdas_jax.target import TargetError

        load_before = os.getloadavg()[0]
        try:
            rows = bench(target_dir, args.shapes, args.runs, torch_attns, args.seed, log)
        except (TargetError, ConversionError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(header(args.runs, (load_before, os.getloadavg()[0])))
    print()
    print(table(rows))
    print()
    print("max abs diff: ours vs torch on the benchmarked batch: the logits, or all n+1 stacked hidden states\n"
          "(SmolLM2's residual stream exceeds 1e4, so float32 rounding alone gives hidden-state diffs ~1e-1).\n"
          "On a shared machine torch's OpenMP threads suffer far more from other processes than XLA's pool;\n"
          "compare rows only when the load average stays below the core count.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
