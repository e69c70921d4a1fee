"""What every stage deployment shares: live batching knobs, a record of batch sizes, one GPU lane.

Deployments stay thin: they own batching, config and metrics; the maths lives in deployments.core.
"""

from __future__ import annotations

import os
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.core.batching import DynamicBatcher
from deployments.core.gpu_lane import GpuLane

BATCH_HISTORY = 1000


class BatchingKnobs(BaseModel):
    """Knobs that change while serving; they arrive in `user_config` and apply in `reconfigure()`.

    The batch wait defaults to 0: a batch forms from what queued while the previous one ran, so a
    wait only delays a lone request; it helps only where bursts arrive a little apart.
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=10.0)


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

    def _init_stage(self, name: str) -> None:
        self.stage_name = name
        self.stats_by_method: dict[str, StageStats] = collections.defaultdict(StageStats)
        self.knobs = BatchingKnobs()
        self.gpu_lane = GpuLane(name)  # one model call at a time per replica, all on one thread
        self.batchers: dict[str, DynamicBatcher] = {}

    def add_batcher(self, method: str, fn: Callable[[list], list], on_gpu: bool = True) -> DynamicBatcher:
        """Batches calls to `fn` (blocking, list in, list out), run off the event loop and recorded."""

        async def run(items: list) -> list:
            if on_gpu:
                return await self.run_model(method, len(items), fn, items)
            start = time.perf_counter()
            results = fn(items)
            self.stats_by_method[method].record(len(items), time.perf_counter() - start)
            return results

        batcher = DynamicBatcher(run, self.knobs.max_batch_size, self.knobs.batch_wait_timeout_s)
        self.batchers[method] = batcher
        return batcher

    def apply_knobs(self, user_config: dict | None) -> None:
        config = dict(user_config or {})
        knob_fields = {k: config.pop(k) for k in list(config) if k in BatchingKnobs.model_fields}
        self.knobs = BatchingKnobs(**{**self.knobs.model_dump(), **knob_fields})
        for batcher in self.batchers.values():
            batcher.max_batch_size = self.knobs.max_batch_size
            batcher.wait_s = self.knobs.batch_wait_timeout_s
        self.apply_extra_config(config)

    def apply_extra_config(self, config: dict) -> None:
        """Stage-specific live settings; unknown keys are an error so typos do not pass silently."""
        if config:
            raise ValueError(f"{self.stage_name}: unknown user_config keys: {', '.join(sorted(config))}")

    async def run_model(self, method: str, size: int, fn, *args):
        """Runs blocking model code off the event loop, one call at a time, and records the batch."""
        async with self.gpu_lane.lock:
            start = time.perf_counter()
            result = await self.gpu_lane.run(fn, *args)
            self.stats_by_method[method].record(size, time.perf_counter() - start)
        return result

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
            "knobs": self.knobs.model_dump(),
            "methods": {name: s.as_dict() for name, s in self.stats_by_method.items()},
        }

    def reset_stats(self) -> None:
        self.stats_by_method.clear()

    def ready(self) -> bool:
        return True
