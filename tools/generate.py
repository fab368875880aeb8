"""Greedy completion from a converted target checkpoint.

  python -m tools.generate --target checkpoints/smollm2 "city to country: Paris is in the country of"
"""

from __future__ import annotations

import argparse
import sys

from hyperdas_jax.target import TargetError, load_target
from tools.cli import positive_int


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="converted target directory")
    parser.add_argument("--max-new-tokens", type=positive_int, default=8, help="tokens to generate (>= 1)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("prompts", nargs="+", help="prompts to complete (one batch, left-padded)")
    args = parser.parse_args(argv)
    try:
        target = load_target(args.target, dtype=args.dtype)
    except TargetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if target.tokenizer is None:
        print(f"error: {args.target} has no tokenizer", file=sys.stderr)
        return 1
    try:
        completions = target.greedy(args.prompts, args.max_new_tokens)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for prompt, completion in zip(args.prompts, completions):
        print(f"{prompt} -> {completion!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
