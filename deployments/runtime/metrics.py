"""The model stages' Prometheus metrics, through Ray Serve's metrics API.

`ray.serve.metrics` adds the `deployment`, `replica` and `application` tags, and Ray's metrics agent
exports every name below with a `ray_` prefix (counters also get `_total`; see README "Operating").
Ray exports a histogram's `_sum` from bucket midpoints, so exact totals are counters (`zimage_stage_items`).
Metrics are made inside a replica (so the Serve tags apply) and recorded per batch, per step and per
queued item: a few microseconds each against milliseconds of model time. `ZIMAGE_METRICS=0` in the
replicas' environment turns them all into no-ops, for measuring what they cost.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence

METRICS_ENV = "ZIMAGE_METRICS"
BATCH_SIZE_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
SECONDS_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


def metrics_enabled() -> bool:
    return os.environ.get(METRICS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


class _Off:
    """Stands in for a metric when metrics are off: every record is a no-op."""

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        pass

    def set(self, value: float, tags: dict | None = None) -> None:
        pass

    def observe(self, value: float, tags: dict | None = None) -> None:
        pass


def counter(name: str, description: str, tag_keys: tuple[str, ...] = ()):
    if not metrics_enabled():
        return _Off()
    from ray.serve.metrics import Counter

    return Counter(name, description=description, tag_keys=tag_keys)


class _KeptGauge:
    """A Ray gauge whose last values are set again every second: Ray's metrics agent drops a gauge
    value that its worker has not reported within two report intervals, so a value set once (the
    policy) or left standing (an empty queue) would vanish from Prometheus."""

    _all: list["_KeptGauge"] = []
    _lock = threading.Lock()

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]):
        from ray.serve.metrics import Gauge

        self.gauge = Gauge(name, description=description, tag_keys=tag_keys)
        self.last: dict[tuple, tuple[float, dict | None]] = {}
        with self._lock:
            if not self._all:
                threading.Thread(target=self._refresh_forever, name="zimage-gauges", daemon=True).start()
            self._all.append(self)

    def set(self, value: float, tags: dict | None = None) -> None:
        self.gauge.set(value, tags)
        self.last[tuple(sorted((tags or {}).items()))] = (value, tags)

    @classmethod
    def _refresh_forever(cls) -> None:
        while True:
            time.sleep(1.0)
            with cls._lock:
                gauges = list(cls._all)
            for kept in gauges:
                for value, tags in list(kept.last.values()):
                    kept.gauge.set(value, tags)


def gauge(name: str, description: str, tag_keys: tuple[str, ...] = ()):
    return _KeptGauge(name, description, tag_keys) if metrics_enabled() else _Off()


def histogram(name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...] = ()):
    if not metrics_enabled():
        return _Off()
    from ray.serve.metrics import Histogram

    return Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)


class StageMetrics:
    """One replica's stage metrics, tagged by batched `method` (encode, decode, style, step, request).

    Also a `deployments.runtime.batching.BatchObserver`: the batchers report queue length, queue wait
    and failed items through `observer(method)`."""

    def __init__(self) -> None:
        self.queue_length = gauge("zimage_stage_queue_length", "Items waiting for a batch.", ("method",))
        self.queue_wait = histogram("zimage_stage_queue_wait_seconds", "Time an item waited before its batch started.",
                                    SECONDS_BOUNDARIES, ("method",))
        self.items = counter("zimage_stage_items",
                             "Items through the model (Denoiser method=step: image steps; its rate is steps/s).",
                             ("method",))
        self.batch_size = histogram("zimage_stage_batch_size", "Items per model call (Denoiser: images per step).",
                                    BATCH_SIZE_BOUNDARIES, ("method",))
        self.model_time = histogram("zimage_stage_model_seconds",
                                    "Model time per batch (Denoiser method=step: device time per step).",
                                    SECONDS_BOUNDARIES, ("method",))
        self.errors = counter("zimage_stage_errors", "Items that failed in the stage.", ("method",))
        self.cancelled = counter("zimage_stage_cancelled",
                                 "Items dropped because their caller went away (Denoiser: at the next step).",
                                 ("method",))
        self.running = gauge("zimage_stage_running", "Items in the running batch (the Denoiser's continuous policy).",
                             ("method",))
        self.gpu_allocated = gauge("zimage_gpu_memory_allocated_bytes", "CUDA memory allocated by this replica.")
        self.gpu_reserved = gauge("zimage_gpu_memory_reserved_bytes", "CUDA memory reserved by this replica's allocator.")
        self.compiles = counter("zimage_compiles_after_ready",
                                "torch.compile (dynamo) compilations after the replica was ready: should stay 0.")

    def observer(self, method: str) -> "MethodObserver":
        return MethodObserver(self, method)

    def batch(self, method: str, size: int, seconds: float) -> None:
        tags = {"method": method}
        self.items.inc(size, tags)
        self.batch_size.observe(size, tags)
        self.model_time.observe(seconds, tags)
        self.gpu_memory()

    def gpu_memory(self) -> None:
        torch = sys.modules.get("torch")  # a stage that never imported torch has no GPU memory
        if torch is not None and torch.cuda.is_initialized():
            self.gpu_allocated.set(torch.cuda.memory_allocated())
            self.gpu_reserved.set(torch.cuda.memory_reserved())

    def watch_compiles(self, expected: Callable[[], bool] | None = None) -> None:
        """From now on (the replica is ready) every dynamo compilation counts: a cold path in serving.
        `expected()` true at a compile's start exempts it (a warm-up the replica runs after ready)."""
        from torch._dynamo.callback import on_compile_start

        def count(*args) -> None:
            if expected is None or not expected():
                self.compiles.inc()

        on_compile_start(count)


class MethodObserver:
    """What a batcher reports for one method."""

    def __init__(self, metrics: StageMetrics, method: str):
        self.metrics = metrics
        self.tags = {"method": method}

    def waiting(self, length: int) -> None:
        self.metrics.queue_length.set(length, self.tags)

    def admitted(self, waits: Sequence[float]) -> None:
        for seconds in waits:
            self.metrics.queue_wait.observe(seconds, self.tags)

    def failed(self, count: int) -> None:
        if count:
            self.metrics.errors.inc(count, self.tags)

    def cancelled(self, count: int) -> None:
        self.metrics.cancelled.inc(count, self.tags)

    def running(self, count: int) -> None:
        self.metrics.running.set(count, self.tags)
