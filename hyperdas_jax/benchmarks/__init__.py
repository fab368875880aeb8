"""Benchmark logic behind tools/bench_*.py (each tool prints its table)."""
