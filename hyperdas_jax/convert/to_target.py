"""Any supported source (an HF Llama folder, a llama GGUF file, the embedded SmolLM2) -> a target checkpoint."""

from __future__ import annotations

import pathlib

from hyperdas_jax.convert.errors import ConversionError


def convert(source: str, out: str, *, param_dtype: str | None = None, overwrite: bool = False,
            tokenizer: str | None = None) -> pathlib.Path:
    """Converts `source` and writes the target checkpoint to `out` (atomically). Returns the path."""
    from hyperdas_jax.convert import gguf_llama, hf_llama
    from hyperdas_jax.config import ModelConfig
    from hyperdas_jax.target import check_replaceable, load_tokenizer, save_target

    out_path = pathlib.Path(out)
    check_replaceable(out_path, overwrite)  # before any loading; save_target checks again when it writes
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
            tok = load_tokenizer(src)
    elif not src.exists():
        raise ConversionError(f"source {source!r} does not exist (expected an HF folder, a .gguf file or 'smollm2')")
    else:
        raise ConversionError(f"source {source!r} is neither an HF folder, a .gguf file nor 'smollm2'")
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    if tok is not None:
        tok.padding_side = "left"
    info = {"source": str(src), "kind": kind}
    return save_target(out_path, model, tok, info=info, overwrite=overwrite)
