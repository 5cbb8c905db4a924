"""Benchmarks: perf_analyzer sweeps, side-by-side comparisons and plots (see benchmarks/README.md)."""
