"""Dynamic batching that forms a batch when the model is free, not when the first item arrives.

Items that arrive while a batch runs wait together and go as the next batch (up to
`max_batch_size`), so batch size follows load on its own; `wait_s` optionally holds a batch
open a little longer for more company. One batch runs at a time per batcher. Plain asyncio, no Ray.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

RunBatch = Callable[[list[Any]], Awaitable[list[Any]]]


@dataclass
class _Waiting:
    item: Any
    future: asyncio.Future
    arrived: float


class DynamicBatcher:
    def __init__(self, run_batch: RunBatch, max_batch_size: int = 8, wait_s: float = 0.0):
        """`run_batch` maps a list of items to a list of results; an Exception in a result's place
        fails that item alone, an exception raised fails the whole batch."""
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._queue: collections.deque[_Waiting] = collections.deque()
        self._arrival = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(item, future, time.monotonic()))
        self._arrival.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drive())
        return await future  # a caller that goes away before its batch starts is skipped

    async def _next_batch(self) -> list[_Waiting]:
        while not self._queue:
            self._arrival.clear()
            await self._arrival.wait()
        deadline = self._queue[0].arrived + self.wait_s
        while len(self._queue) < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            waiting = self._queue.popleft()
            if not waiting.future.done():
                batch.append(waiting)
        return batch

    async def _drive(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await self.run_batch([w.item for w in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
            except Exception as exc:  # the batch failed: each of its callers hears why
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(exc)
                continue
            for waiting, result in zip(batch, results):
                if waiting.future.done():
                    continue
                if isinstance(result, BaseException):
                    waiting.future.set_exception(result)
                else:
                    waiting.future.set_result(result)
