"""One thread and one lock for a replica's model calls.

cuDNN keeps its attention plans per thread, and a new shape's plan costs tens of milliseconds on
an H200 (benchmarks/warmup_coverage.py; benchmarks/RESULTS.md). `asyncio.to_thread` spreads calls
over a pool of threads, so every thread would plan every shape again, and a warm-up run on the
constructor's thread would warm none of them. So all model work of a replica, its warm-up
included, runs on one thread, one call at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class GpuLane:
    def __init__(self, name: str = "model"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-lane")
        self.lock = asyncio.Lock()  # held across calls that must not interleave (admission + step)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn(*args)` on the lane's thread; the caller holds `lock` when calls must not interleave."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """For constructors (loading, compiling, warm-up) that run before any event loop serves."""
        return self._executor.submit(fn, *args).result()
