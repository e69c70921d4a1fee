"""Dynamic batching that forms a batch when the model is free, not when the first item arrives.

Items that arrive while a batch runs wait together and go as the next batch (up to
`max_batch_size`), so batch size follows load on its own; `wait_s` optionally holds a batch
open a little longer for more company. One batch runs at a time per batcher. Plain asyncio, no Ray.

A `BatchObserver` hears the queue's length, each item's wait before its batch started and the items
that failed (the deployments turn these into metrics). The batch task runs in a context of its own,
so that it carries no caller's request context (and so no caller's request ID) in its log lines.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

RunBatch = Callable[[list[Any]], Awaitable[list[Any]]]


class BatchObserver:
    """What a batcher reports; this base ignores it all."""

    def waiting(self, length: int) -> None:
        """The number of items waiting, after it changed."""

    def admitted(self, waits: Sequence[float]) -> None:
        """Items that left the queue for a batch, with the seconds each waited."""

    def failed(self, count: int) -> None:
        """Items that failed."""

    def cancelled(self, count: int) -> None:
        """Items dropped because their caller went away."""

    def running(self, count: int) -> None:
        """Items being worked on (step-level batching, where items stay in the batch for many steps)."""


@dataclass
class Queued:
    """One submitted item: its caller's future, when it arrived and when its work started
    (`time.monotonic()`)."""

    item: Any
    future: asyncio.Future
    arrived: float
    started: float = 0.0


class QueueDrainer:
    """What both batchers (this one and the Denoiser's step-level one) share: `submit_timed` queues an
    item, wakes the one task that drains the queue (started on first use, in a context of its own)
    and awaits the item's result with the seconds it waited before its work started. A subclass's
    `_drive` drains `queue` and sets each item's `started`."""

    def __init__(self, observer: BatchObserver | None = None):
        self.observer = observer or BatchObserver()
        self.queue: collections.deque[Queued] = collections.deque()
        self._arrival = asyncio.Event()
        self._task: asyncio.Task | None = None

    def _queued(self, item: Any, future: asyncio.Future) -> Queued:
        return Queued(item, future, time.monotonic())

    async def submit(self, item: Any) -> Any:
        return (await self.submit_timed(item))[0]

    async def submit_timed(self, item: Any) -> tuple[Any, float]:
        """(result, seconds the item waited before its work started)."""
        future = asyncio.get_running_loop().create_future()
        queued = self._queued(item, future)
        self.queue.append(queued)
        self.observer.waiting(len(self.queue))
        self._arrival.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drive(), context=contextvars.Context())
        result = await future  # a caller that goes away is skipped, or its running job dropped
        return result, queued.started - queued.arrived

    async def _drive(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Cancels the task that drains the queue, from any thread (its loop cancels it on its next
        turn): a replica's shutdown. A later `submit` starts a new one."""
        task, self._task = self._task, None
        if task is not None and not task.done() and not task.get_loop().is_closed():
            task.get_loop().call_soon_threadsafe(task.cancel)

    async def aclose(self) -> None:
        """`close`, on the task's own loop, and waits until the task has ended; items still queued are
        cancelled (their callers see CancelledError)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])  # the task's CancelledError stays in it; a cancel of ours still raises
        while self.queue:
            waiting = self.queue.popleft()
            if not waiting.future.done():
                waiting.future.cancel()
        self.observer.waiting(0)


class DynamicBatcher(QueueDrainer):
    def __init__(self, run_batch: RunBatch, max_batch_size: int = 8, wait_s: float = 0.0,
                 observer: BatchObserver | None = None):
        """`run_batch` maps a list of items to a list of results; an Exception in a result's place
        fails that item alone, an exception raised fails the whole batch."""
        super().__init__(observer)
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s

    async def _next_batch(self) -> list[Queued]:
        while not self.queue:
            self._arrival.clear()
            await self._arrival.wait()
        deadline = self.queue[0].arrived + self.wait_s
        while len(self.queue) < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch, gone = [], 0
        while self.queue and len(batch) < self.max_batch_size:
            waiting = self.queue.popleft()
            if not waiting.future.done():
                batch.append(waiting)
            else:
                gone += 1
        if gone:
            self.observer.cancelled(gone)
        now = time.monotonic()
        for waiting in batch:
            waiting.started = now
        self.observer.waiting(len(self.queue))
        self.observer.admitted([now - w.arrived for w in batch])
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
            except asyncio.CancelledError:  # closed mid-batch: its callers are not left waiting
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.cancel()
                raise
            except Exception as exc:  # the batch failed: each of its callers hears why
                self.observer.failed(len(batch))
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(exc)
                continue
            self.observer.failed(sum(isinstance(result, BaseException) for result in results))
            for waiting, result in zip(batch, results):
                if waiting.future.done():
                    continue
                if isinstance(result, BaseException):
                    waiting.future.set_exception(result)
                else:
                    waiting.future.set_result(result)
