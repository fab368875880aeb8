"""Time our jitted forward (logits and hidden-states-only) against transformers' torch forward, same dtype.

  python -m tools.bench_forward                       # checkpoints/smollm2, or a fresh conversion
  python -m tools.bench_forward --target checkpoints/smollm2 --runs 20 --shapes 8x16,32x32 --torch-attn eager
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

from hyperdas_jax.benchmarks.flops import PEAK_SIZE
from hyperdas_jax.benchmarks.forward import bench, header, table
from hyperdas_jax.convert.errors import ConversionError
from hyperdas_jax.convert.to_target import convert
from hyperdas_jax.target import TargetError
from tools.cli import positive_int

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_TARGET = REPO / "checkpoints" / "smollm2"


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
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32"],
                        help="weights and compute dtype of both sides (default float32)")
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
            target_dir = pathlib.Path(tmp) / "smollm2"
            print(f"target: {DEFAULT_TARGET} missing; converting SmolLM2 into temporary {target_dir}")
            convert("smollm2", str(target_dir))

        load_before = os.getloadavg()[0]
        try:
            rows = [r for dtype in args.dtypes
                    for r in bench(target_dir, args.shapes, args.runs, torch_attns, args.seed, log, dtype)]
        except (TargetError, ConversionError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(header(args.runs, (load_before, os.getloadavg()[0])))
    print()
    print(table(rows))
    print()
    print("max abs diff: ours vs torch on the benchmarked batch: the logits, or all n+1 stacked hidden states\n"
          "(SmolLM2's residual stream exceeds 1e4, so float32 rounding alone gives hidden-state diffs ~1e-1).\n"
          "GFLOP: the forward's matmuls (hyperdas_jax/benchmarks/flops.py); each side's rate is a share of its own\n"
          f"jitted / torch {PEAK_SIZE}^3 product in that dtype, timed in this run. ceiling: the speed-up over torch\n"
          "our forward would show with every matmul at XLA's peak, the most kernel tuning could give.\n"
          "On a shared machine torch's OpenMP threads suffer far more from other processes than XLA's pool;\n"
          "compare rows only when the load average stays below the core count.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
