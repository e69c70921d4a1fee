"""One thread and one lock for a replica's model calls.

cuDNN keeps its attention plans per thread, and a new shape's plan costs tens of milliseconds on
an H200 (benchmarks/warmup_coverage.py; benchmarks/RESULTS.md). `asyncio.to_thread` spreads calls
over a pool of threads, so every thread would plan every shape again, and a warm-up run on the
constructor's thread would warm none of them. So all model work of a replica, its warm-up
included, runs on one thread, one call at a time.

The lane also keeps what a health check needs: the first fatal device error a call raised (after
a CUDA error the context is unusable, so the replica can no longer serve) and when the call in
progress started (a call stuck far past its expected time means the same).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# Messages of errors after which a CUDA context cannot be trusted again (out-of-memory is not one).
FATAL_DEVICE_ERRORS = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert", "illegal memory access")


def is_fatal_device_error(exc: BaseException) -> bool:
    # read from sys.modules: a process that never imported torch (PromptStyler) has no device error
    accelerator_error = getattr(sys.modules.get("torch"), "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or any(text in str(exc) for text in FATAL_DEVICE_ERRORS)


class GpuLane:
    def __init__(self, name: str = "model"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-lane")
        self.lock = asyncio.Lock()  # held across calls that must not interleave (admission + step)
        self.call_started: float | None = None  # time.monotonic() of the call in progress
        self.fatal_error: str | None = None

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        self.call_started = time.monotonic()
        try:
            return fn(*args)
        except Exception as exc:
            if self.fatal_error is None and is_fatal_device_error(exc):
                self.fatal_error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.call_started = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn(*args)` on the lane's thread; the caller holds `lock` when calls must not interleave."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn, *args)

    def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """For constructors (loading, compiling, warm-up) that run before any event loop serves."""
        return self._executor.submit(self._call, fn, *args).result()

    def health_problem(self, max_call_s: float) -> str | None:
        """Why the lane can no longer serve, or None: a fatal device error, or a call stuck too long."""
        if self.fatal_error is not None:
            return f"the model thread hit a fatal device error: {self.fatal_error}"
        started = self.call_started
        if started is not None and time.monotonic() - started > max_call_s:
            return f"a model call has run for {time.monotonic() - started:.0f}s, over {max_call_s:g}s"
        return None
