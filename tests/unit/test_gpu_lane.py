"""A replica's model calls all run on one thread (cuDNN's attention plans are per thread), one at a time."""

from __future__ import annotations

import asyncio
import threading
import time

from deployments.runtime.gpu_lane import GpuLane


async def exclusive(lane: GpuLane, fn):
    """As the stages call it: the lock held around the call."""
    async with lane.lock:
        return await lane.run(fn)


def test_every_call_runs_on_the_same_thread_including_the_constructors():
    lane = GpuLane("test")
    threads = {lane.run_blocking(threading.get_ident)}

    async def serve() -> None:
        for _ in range(8):
            threads.add(await lane.run(threading.get_ident))
        threads.update(await asyncio.gather(*(exclusive(lane, threading.get_ident) for _ in range(8))))

    asyncio.run(serve())
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_calls_do_not_overlap_and_the_event_loop_stays_free():
    lane = GpuLane("test")
    active, overlaps, ticks = [0], [], []

    def model_call() -> None:
        active[0] += 1
        overlaps.append(active[0])
        time.sleep(0.05)
        active[0] -= 1

    async def ticker() -> None:
        for _ in range(5):
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.01)

    async def serve() -> None:
        await asyncio.gather(ticker(), *(exclusive(lane, model_call) for _ in range(5)))

    asyncio.run(serve())
    assert max(overlaps) == 1
    assert len(ticks) == 5 and ticks[-1] - ticks[0] < 0.2  # ticked while the calls (0.25 s) ran
