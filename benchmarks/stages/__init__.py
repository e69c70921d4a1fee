"""One module per thing `benchmarks/bench_stages.py` measures; each section takes a `Bench`."""
