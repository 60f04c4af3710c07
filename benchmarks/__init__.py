"""Benchmarks of nanwatch's client overhead and service throughput; run them with ``python -m benchmarks.run``."""
