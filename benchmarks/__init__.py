"""Latency, throughput and memory benchmarks; run from the repository root with `python -m`."""
