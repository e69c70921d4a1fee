"""The timing harness the GPU benchmarks share: CUDA-event timing, relative error, and `Bench`, which
times a call (median after warm-up, peak memory), prints a row per figure and writes the results as
JSON with the device, date and commit after every section, so a run cut short still leaves data."""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.run_info import commit


class Bench:
    """One benchmark run: its options, its device, the results so far and the JSON they go to."""

    def __init__(self, args: argparse.Namespace, summarize: Callable[[dict[str, Any]], list[dict[str, Any]]]):
        self.args = args
        self.summarize = summarize  # the benchmark's table, stored with the raw rows in every write
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.started = time.perf_counter()
        self.repeats = args.repeats or (3 if args.quick else 5)
        self.warmups = 1 if args.quick else 2
        self.backend = args.compile_backend or ("inductor" if self.cuda else "eager")
        self.results: dict[str, Any] = {"meta": self.meta(), "rows": [], "compile": {}, "accuracy": {}, "notes": []}

    # ---- bookkeeping

    def meta(self) -> dict[str, Any]:
        args = self.args
        meta: dict[str, Any] = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
            "model": args.model,
            "dtype": str(self.dtype).removeprefix("torch."),
            "args": vars(args),
        }
        if self.cuda:
            meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability(self.device)))
        for name in ("diffusers", "torchao", "transformers"):
            try:
                meta[name] = __import__(name).__version__
            except Exception:  # noqa: BLE001 - optional on the CPU smoke run
                meta[name] = None
        return meta

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.args.budget_s - self.elapsed()

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.results["notes"].append(text)

    def write(self) -> None:
        self.results["summary"] = self.summarize(self.results)
        self.results["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        if self.args.json:
            path = Path(self.args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.results, indent=2, default=str))
            tmp.replace(path)

    def row(self, stage: str, size: int | None, variant: str, timing: dict[str, Any], **extra: Any) -> None:
        entry = {"stage": stage, "size": size, "variant": variant, **timing, **extra}
        self.results["rows"].append(entry)
        peak = f", peak {timing['peak_gb']:.2f} GB (+{timing['extra_gb']:.2f})" if timing.get("peak_gb") else ""
        print(f"  {stage:<13} {size or '':>5} {variant:<26} {timing['median_ms']:10.2f} ms{peak}", flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def allocated_gb(self) -> float | None:
        return torch.cuda.memory_allocated(self.device) / 2**30 if self.cuda else None

    def measure(self, fn: Callable[[], Any], repeats: int | None = None, warmups: int | None = None) -> dict[str, Any]:
        """Median wall time of `fn` after warm-up, with the peak memory over the timed runs."""
        for _ in range(self.warmups if warmups is None else warmups):
            fn()
        self.sync()
        base = None
        if self.cuda:
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(repeats or self.repeats):
            if self.cuda:
                times.append(cuda_time_ms(fn))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000.0)
        out: dict[str, Any] = {
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "runs": len(times),
        }
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            out.update(resident_gb=base / 2**30, peak_gb=peak / 2**30, extra_gb=(peak - base) / 2**30)
        return out

    def first_call_s(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def graphed(fn: Callable[[], Any], calls: int = 1) -> Callable[[], Any]:
    """`calls` calls of `fn` (fixed inputs, no host sync) captured as one CUDA graph, after warm-up
    calls on a side stream; returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def cuda_missing(script: str) -> bool:
    """True, having said so on stderr, where no CUDA GPU is visible: the GPU-only scripts then exit 2."""
    if torch.cuda.is_available():
        return False
    print(f"{script} needs a CUDA GPU", file=sys.stderr)
    return True


def cuda_time_ms(fn: Callable[[], Any]) -> float:
    """GPU time of one call of `fn`, between CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()

