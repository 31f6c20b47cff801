"""Benchmark scripts: each prints its numbers, saves JSON and a plot, and writes them into docs/."""
