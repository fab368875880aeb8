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
