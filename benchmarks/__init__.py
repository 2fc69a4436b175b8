"""Benchmarks: latency per token budget, decode speed against peers; RESULTS.md holds the figures."""
