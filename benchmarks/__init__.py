"""Benchmarks: load generator, baseline server, stage timings."""
