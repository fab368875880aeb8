"""Smoke test of tools/bench_forward.py on the real SmolLM2 at a tiny shape."""

import math
import re

import pytest

from hyperdas_jax.benchmarks import flops
from hyperdas_jax.benchmarks.forward import MODES
from hyperdas_jax.target import read_model_config
from tools import bench_forward

pytestmark = pytest.mark.slow


def test_bench_forward_prints_both_modes_and_dtypes_with_speedups(smollm2_target_dir, capsys):
    rc = bench_forward.main(["--target", str(smollm2_target_dir), "--runs", "1", "--shapes", "1x4",
                             "--dtypes", "float32", "bfloat16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "1×4" in line]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert sorted((c[0], c[1]) for c in cells) == sorted((m, d) for m in MODES for d in ("float32", "bfloat16"))
    for row, c in zip(rows, cells):
        assert re.fullmatch(r"\d+\.\d+x", c[8]), row  # speed-up torch_ms / ours_ms
        assert float(c[8][:-1]) > 0
        # The forward's matmul FLOPs (SmolLM2, one 4-token row) and the speed-up at XLA's measured peak.
        expected = flops.forward_flops(read_model_config(smollm2_target_dir), 1, 4, logits=c[0] == "logits")
        assert float(c[10]) == pytest.approx(expected / 1e9, abs=0.005), row
        assert re.fullmatch(r"\d+%", c[11]) and re.fullmatch(r"\d+%", c[12]), row
        assert re.fullmatch(r"\d+\.\d+x", c[13]) and float(c[13][:-1]) > 0, row
        if c[1] == "float32":
            assert float(c[9]) < 1.0, row  # ours and torch agree (max abs difference)
        else:
            assert math.isfinite(float(c[9])), row
    assert "torch threads" in out
