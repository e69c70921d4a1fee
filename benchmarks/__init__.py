"""Benchmarks: each script is `bench_<what>.py` and records its figures as JSON; RESULTS.md quotes them
with device, date and commit, and `results/<date>-<device>/` keeps the raw JSON.

    loadgen/          the load generator (closed and open loop) against any OpenAI-style images server
    stages/           what `bench_stages.py` measures, one module per stage
    baseline_server   plain diffusers behind the same API, the baseline of `bench_serve.py`
    harness, run_info what the scripts share: timing, device and commit metadata
Other scripts (`profile_step.py`, `data_path_bytes.py`, `warmup_coverage.py`) profile or count rather
than benchmark."""
