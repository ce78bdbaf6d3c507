"""Benchmarks for crust (loopback only). Run ``python -m benchmarks.bench_tcp --help``."""
