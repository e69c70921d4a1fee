"""What every stage deployment shares: live config that merges, a record of batch sizes, one GPU lane.

Deployments stay thin: they own batching, config and metrics; the maths lives beside each shell, in its stage package.

Live config: each stage's `config_model` (a pydantic model) holds the defaults of what may change
while serving. The builder binds every replica to the complete config made from the application's
args (`base_config`) and sends the same as `user_config`. A `user_config` override in a Serve config
file replaces Serve's copy wholesale; `reconfigure()` lays it over `base_config`, so an override
changes only what it names, and removing it brings back the shipped values.
"""

from __future__ import annotations

import os
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.runtime.batching import DynamicBatcher
from deployments.runtime.gpu_lane import GpuLane
from deployments.runtime.start_phases import StartPhases
from deployments.runtime.metrics import StageMetrics

BATCH_HISTORY = 1000


class StageConfig(BaseModel):
    """Live settings every batched stage has; a stage's own model adds its keys and defaults.

    The batch wait defaults to 0: a batch forms from what queued while the previous one ran, so a
    wait only delays a lone request; it helps only where bursts arrive a little apart.
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=10.0)
    max_model_call_s: float = Field(300.0, gt=0)
    """A model call running longer than this fails the replica's health check (a stuck GPU)."""


def deep_merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """`override` laid over `base`: nested dicts merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class StageStats:
    """Counters a test or a metrics exporter reads through `stats()`."""

    batch_sizes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=BATCH_HISTORY))
    items: int = 0
    batches: int = 0
    busy_s: float = 0.0

    def record(self, size: int, seconds: float) -> None:
        self.batch_sizes.append(size)
        self.items += size
        self.batches += 1
        self.busy_s += seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes),
            "items": self.items,
            "batches": self.batches,
            "busy_s": round(self.busy_s, 4),
        }


class StageBase:
    """Mixin for stage deployments: each batched method is a `DynamicBatcher` made by `add_batcher`."""

    config_model: type[StageConfig] = StageConfig

    def _init_stage(self, name: str, base_config: dict[str, Any] | None = None) -> None:
        self.stage_name = name
        self.stats_by_method: dict[str, StageStats] = collections.defaultdict(StageStats)
        self.base_config = dict(base_config or {})
        self.config = self.config_model.model_validate(self.base_config)
        self.gpu_lane = GpuLane(name)  # one model call at a time per replica, all on one thread
        self.batchers: dict[str, DynamicBatcher] = {}
        self.start_phases = StartPhases()  # each stage times its own start: load, quantize, compile, warm-up
        self.metrics = StageMetrics()

    def add_batcher(self, method: str, fn: Callable[[list], list], on_gpu: bool = True) -> DynamicBatcher:
        """Batches calls to `fn` (blocking, list in, list out), run off the event loop and recorded."""

        async def run(items: list) -> list:
            if on_gpu:
                return await self.run_model(method, len(items), fn, items)
            start = time.perf_counter()
            results = fn(items)
            self.record_batch(method, len(items), time.perf_counter() - start)
            return results

        batcher = DynamicBatcher(run, self.config.max_batch_size, self.config.batch_wait_timeout_s,
                                 self.metrics.observer(method))
        self.batchers[method] = batcher
        return batcher

    def reconfigure(self, user_config: dict | None) -> None:
        """Serve's live-config hook: `user_config` over the bound `base_config`, validated, then applied.
        Unknown keys fail the update (pydantic's extra="forbid"), so typos do not pass silently."""
        self.config = self.config_model.model_validate(deep_merge(self.base_config, user_config))
        for batcher in self.batchers.values():
            batcher.max_batch_size = self.config.max_batch_size
            batcher.wait_s = self.config.batch_wait_timeout_s
        self.apply_config(self.config)

    def apply_config(self, config: StageConfig) -> None:
        """Stage-specific live settings beyond batching; the default has none."""

    async def run_model(self, method: str, size: int, fn, *args):
        """Runs blocking model code off the event loop, one call at a time, and records the batch."""
        return (await self.run_model_timed(method, size, fn, *args))[0]

    async def run_model_timed(self, method: str, size: int, fn, *args) -> tuple[Any, float]:
        """(`run_model`'s result, seconds it waited for the replica's model thread)."""
        arrived = time.perf_counter()
        async with self.gpu_lane.lock:
            start = time.perf_counter()
            result = await self.gpu_lane.run(fn, *args)
            self.record_batch(method, size, time.perf_counter() - start)
        return result, start - arrived

    def record_batch(self, method: str, size: int, seconds: float) -> None:
        """One model call: into `stats()` and the metrics."""
        self.stats_by_method[method].record(size, seconds)
        self.metrics.batch(method, size, seconds)

    def serving(self, expected_compiles: Callable[[], bool] | None = None) -> None:
        """Called at the end of a stage's constructor: warm-up is over, so a compile from now on is a
        cold path on the request path, counted in `zimage_compiles_after_ready` (except while
        `expected_compiles()` is true: a warm-up the stage runs after it reported ready)."""
        self.metrics.watch_compiles(expected_compiles)

    def stats(self) -> dict[str, Any]:
        import torch

        gpu = {}
        if torch.cuda.is_available():
            gpu = {
                "gpu_peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "gpu_peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3),
                "gpu_allocated_gb": round(torch.cuda.memory_allocated() / 2**30, 3),
            }
        return {
            **gpu,
            "stage": self.stage_name,
            "pid": os.getpid(),
            "config": self.config.model_dump(mode="json"),
            "start_phases": self.start_phases.as_dict(),
            "methods": {name: s.as_dict() for name, s in self.stats_by_method.items()},
        }

    def reset_stats(self) -> None:
        self.stats_by_method.clear()

    def check_health(self) -> None:
        """Serve's health hook: fails when the model can no longer serve, so Serve replaces the replica."""
        problem = self.gpu_lane.health_problem(self.config.max_model_call_s)
        if problem:
            raise RuntimeError(f"{self.stage_name}: {problem}")
