"""The model stages' Prometheus metrics, through Ray Serve's metrics API.

`ray.serve.metrics` adds the `deployment`, `replica` and `application` tags, and Ray's metrics agent
exports every name below with a `ray_` prefix (counters also get `_total`; see README "Operating").
Metrics are made inside a replica (so the Serve tags apply) and recorded per batch, per step and per
queued item: a few microseconds each against milliseconds of model time. `ZIMAGE_METRICS=0` in the
replicas' environment turns them all into no-ops, for measuring what they cost.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

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


def gauge(name: str, description: str, tag_keys: tuple[str, ...] = ()):
    if not metrics_enabled():
        return _Off()
    from ray.serve.metrics import Gauge

    return Gauge(name, description=description, tag_keys=tag_keys)


def histogram(name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...] = ()):
    if not metrics_enabled():
        return _Off()
    from ray.serve.metrics import Histogram

    return Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)


class StageMetrics:
    """One replica's stage metrics, tagged by batched `method` (encode, decode, style, step, request).

    Also a `deployments.core.batching.BatchObserver`: the batchers report queue length, queue wait
    and failed items through `observer(method)`."""

    def __init__(self) -> None:
        self.queue_length = gauge("zimage_stage_queue_length", "Items waiting for a batch.", ("method",))
        self.queue_wait = histogram("zimage_stage_queue_wait_seconds", "Time an item waited before its batch started.",
                                    SECONDS_BOUNDARIES, ("method",))
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
        self.batch_size.observe(size, tags)
        self.model_time.observe(seconds, tags)
        self.gpu_memory()

    def gpu_memory(self) -> None:
        import torch

        if torch.cuda.is_initialized():
            self.gpu_allocated.set(torch.cuda.memory_allocated())
            self.gpu_reserved.set(torch.cuda.memory_reserved())

    def watch_compiles(self) -> None:
        """From now on (the replica is ready) every dynamo compilation counts: a cold path in serving."""
        from torch._dynamo.callback import on_compile_start

        on_compile_start(lambda *args: self.compiles.inc())


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


class DenoiserMetrics:
    """The Denoiser's own: image steps (their rate is steps per second) and the active policy.
    Its per-step time, images per step, images running and dropped jobs are the stage metrics of
    method `step`."""

    def __init__(self, policies: Sequence[str]) -> None:
        self.policies = tuple(policies)
        self.image_steps = counter("zimage_denoiser_image_steps", "Images advanced by one denoising step.")
        self.policy = gauge("zimage_denoiser_scheduling_policy", "1 for the active scheduling policy.", ("policy",))

    def set_policy(self, active: str) -> None:
        for name in self.policies:
            self.policy.set(1.0 if name == active else 0.0, {"policy": name})
