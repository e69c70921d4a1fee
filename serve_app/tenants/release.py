"""The Ingress's fair share of the GPU: admitted work waits here, per key, until the pipeline has room.

Reordering the Denoiser's queue alone cannot make keys fair: a flood's excess waits ahead of it in
Ray's first-in-first-out router queues and in the text encoder's and VAE's queues. So each Ingress
replica keeps the requests it admitted but has not sent on in per-key queues, and releases them by
weighted fair share (deployments/runtime/fair_share.py: a request costs its megapixel-steps, keys
with work waiting take in proportion to their weights) while the images it has in flight past the
Ingress are under its window; the Denoiser's queue then orders what it holds the same way. A
request is released whole and keeps its release until it ends, so a key's requests keep their order
and nothing running is held back.

The window (`api.release_window`: images per running Denoiser replica, divided among the running
Ingress replicas) keeps the GPUs busy, a full step batch and the next jobs close behind it, while
staying under what the Denoisers take at once (`max_ongoing_requests`), so that nothing released
waits in a router queue behind another key's flood. benchmarks/bench_tenants.py measures it. None
releases every request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from deployments.runtime.fair_share import FairShare
from serve_app.tenants.keys import Tenant


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future
    images: int
    name: str


class ReleaseGate:
    def __init__(self, window: float | None = None,
                 on_wait: Callable[[str, float], None] = lambda name, seconds: None,
                 on_waiting: Callable[[str, int], None] = lambda name, count: None):
        """`on_wait(key name, seconds)`: a request released, after the seconds it waited; `on_waiting(key
        name, count)`: how many of the key's requests wait now (the metrics' hooks)."""
        self.window = window
        self.in_flight = 0  # images released and not yet finished
        self.on_wait = on_wait
        self.on_waiting = on_waiting
        self._waiting: FairShare[_Waiter] = FairShare()
        self._count: dict[str, int] = {}

    def set_window(self, window: float | None) -> None:
        self.window = window
        self._release()

    def waiting(self, name: str) -> int:
        return self._count.get(name, 0)

    def _has_room(self) -> bool:
        return self.window is None or self.in_flight < self.window

    async def acquire(self, tenant: Tenant, work: float, images: int) -> None:
        """Returns once the request (`images` images, `work` megapixel-steps) is released; cancelled
        while waiting, it leaves the queue. A request with no other waiting and room goes at once."""
        if not self._waiting and self._has_room():
            self._waiting.charge(tenant.name, work, tenant.weight)  # what goes unqueued counts too
            self.in_flight += images
            self.on_wait(tenant.name, 0.0)
            return
        waiter = _Waiter(asyncio.get_running_loop().create_future(), images, tenant.name)
        self._waiting.push(tenant.name, waiter, work, tenant.weight)
        self._counted(tenant.name, 1)
        started = time.monotonic()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.leave(images)  # released as it was cancelled: give the room back
            elif self._waiting.remove(lambda item: item is waiter):
                self._counted(tenant.name, -1)
            raise
        self.on_wait(tenant.name, time.monotonic() - started)

    def leave(self, images: int) -> None:
        """A released request ended: its room goes to the next in fair order."""
        self.in_flight = max(0, self.in_flight - images)
        self._release()

    @contextlib.asynccontextmanager
    async def released(self, tenant: Tenant, work: float, images: int) -> AsyncIterator[None]:
        await self.acquire(tenant, work, images)
        try:
            yield
        finally:
            self.leave(images)

    def _release(self) -> None:
        while self._has_room():
            waiter = self._waiting.pop()
            if waiter is None:
                return
            self._counted(waiter.name, -1)
            if waiter.future.done():  # its caller was cancelled and has not yet taken itself out
                continue
            self.in_flight += waiter.images
            waiter.future.set_result(None)

    def _counted(self, name: str, change: int) -> None:
        count = self._count.get(name, 0) + change
        if count:
            self._count[name] = count
        else:
            self._count.pop(name, None)
        self.on_waiting(name, count)
