"""Smoke runs of the thin CLIs on the tiny random config."""

import re

from tools import bench_train_step


def test_bench_train_step_prints_its_table(capsys):
    assert bench_train_step.main(["--config", "configs/tiny.yaml", "--runs", "1", "--tokens", "8,16,16"]) == 0
    out = capsys.readouterr().out
    assert "| **total** |" in out and "fraction of peak" in out
    frac = float(re.search(r"\| fraction of peak \| ([0-9.]+)% \|", out).group(1))
    assert frac > 0
    assert float(re.search(r"\| cached step speed-up \(same run\) \| ([0-9.]+)x \|", out).group(1)) > 0
    assert "peak RSS" in out
    assert "memories of all" not in out  # full-length prompts: every position is visible


def test_bench_train_step_on_padded_prompts_times_both_memories(capsys):
    import numpy as np
    import pytest

    from hyperdas_jax.benchmarks.train_step import synthetic_batch

    batch = synthetic_batch(np.random.default_rng(0), 2, 8, 32, 32, 97, visible=(5, 6))
    assert batch["base_mask"].sum(1).tolist() == [5 + 3 + 3] * 2 and batch["source_mask"].sum(1).tolist() == [10] * 2
    assert batch["base_intervention_mask"].sum(1).tolist() == [5] * 2
    assert batch["base_memory_index"].shape == batch["source_memory_index"].shape == (2, 16)
    assert batch["base_entity_pos"].tolist() == [32 - 11 + 4] * 2
    with pytest.raises(ValueError, match="visible"):
        synthetic_batch(np.random.default_rng(0), 2, 8, 32, 32, 97, visible=(30, 6))
    assert bench_train_step.main(["--config", "configs/tiny.yaml", "--runs", "1", "--tokens", "8,32,32",
                                  "--visible", "5,6"]) == 0
    out = capsys.readouterr().out
    assert "memories of 16/16 visible" in out
    ms = float(re.search(r"\| cached step, memories of all 32/32 positions \(ms\) \| ([0-9.]+) \|", out).group(1))
    assert ms > 0
    assert float(re.search(r"\| visible-token memories speed-up \(same run\) \| ([0-9.]+)x \|", out).group(1)) > 0


def test_torch_forward_timing_and_the_multiple_of_the_original_step():
    import torch
    import transformers

    from hyperdas_jax.benchmarks.train_step import ORIGINAL_STEP_FORWARDS, original_multiples, torch_forward_s

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    for dtype in ("float32", "bfloat16"):
        assert torch_forward_s(model, dtype, runs=2, shape=(2, 5)) > 0
        assert next(model.parameters()).dtype == torch.float32  # cast back after the measurement
    # The original's step = factor x forward; ours is a multiple of it (> 1: faster).
    got = original_multiples(2.0, {"float32": 0.5, "bfloat16": 0.25}, "amd")
    assert got == {"float32": ORIGINAL_STEP_FORWARDS["amd"]["float32"] * 0.5 / 2.0,
                   "bfloat16": ORIGINAL_STEP_FORWARDS["amd"]["bfloat16"] * 0.25 / 2.0}
    assert original_multiples(2.0, {"float32": 0.5}, None) == {}
