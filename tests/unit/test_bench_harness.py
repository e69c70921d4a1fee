"""The stage benchmarks' harness on the CPU: timing, relative error and the JSON it writes."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from benchmarks.harness import Bench, rel_err


def cpu_args(tmp_path, **overrides) -> argparse.Namespace:
    values = {"device": "cpu", "model": "tiny", "repeats": 3, "quick": True, "compile_backend": None,
              "budget_s": 60.0, "json": str(tmp_path / "bench.json")}
    return argparse.Namespace(**(values | overrides))


def test_rel_err():
    b = torch.tensor([3.0, 4.0])
    assert rel_err(b, b) == 0.0
    assert rel_err(b + torch.tensor([0.3, 0.4]), b) == pytest.approx(0.1)
    assert rel_err(torch.ones(2, dtype=torch.bfloat16), torch.ones(2)) == 0.0  # any dtype, compared in float64


def test_measure_on_the_cpu_times_after_warm_up(tmp_path):
    bench = Bench(cpu_args(tmp_path), summarize=lambda results: [dict(r) for r in results["rows"]])
    calls = []

    def work() -> None:
        calls.append(1)
        time.sleep(0.01)

    timing = bench.measure(work)
    assert len(calls) == bench.warmups + 3 and timing["runs"] == 3
    assert 10.0 <= timing["min_ms"] <= timing["median_ms"] < 1000.0
    assert "peak_gb" not in timing  # memory figures are CUDA's

    bench.row("vae_decode", 512, "plain", timing)
    bench.write()
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {"date", "commit", "torch", "device", "model", "dtype", "args", "elapsed_s"} <= set(data["meta"])
    assert data["meta"]["device"] == "cpu" and data["meta"]["dtype"] == "float32"
    assert data["rows"][0]["variant"] == "plain" and data["summary"] == data["rows"]
