"""Smoke test of tools/bench_forward.py on the real SmolLM2 at a tiny shape."""

import re

import pytest

from hyperdas_jax.benchmarks.forward import MODES
from tools import bench_forward

pytestmark = pytest.mark.slow


def test_bench_forward_prints_both_modes_with_speedups(smollm2_target_dir, capsys):
    rc = bench_forward.main(["--target", str(smollm2_target_dir), "--runs", "1", "--shapes", "1x4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "1×4" in line]
    assert {row.split("|")[1].strip() for row in rows} == set(MODES)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d+x", cells[7]), row  # speed-up torch_ms / ours_ms
        assert float(cells[7][:-1]) > 0
        assert float(cells[8]) < 1.0, row  # ours and torch agree (max abs difference)
    assert "torch threads" in out
