"""Admission and deadlines: how many requests run at once, and how long each may take.

A request over `api.max_inflight_requests` is refused with a 503 at once rather than queued behind
work it would wait for. An admitted request runs under its deadline (the client's
`X-Request-Timeout` or the handle API's `timeout_s`, capped by `api.request_timeout_s`); the
deadline travels with it to the stages, so the Denoiser drops its work when it passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

from serve_app.errors import ApiError, bad_request, deadline_exceeded
from serve_app.pipeline import ImagePipeline, RequestPlan
from serve_app.protocol import ImageResult
from serve_app.streaming import StreamItem

TIMEOUT_HEADER = "x-request-timeout"


def timeout_s(asked: str | float | None, cap: float, param: str = "X-Request-Timeout") -> float:
    """The request's time budget: what the client asked for, capped by the server's `cap`."""
    if asked is None:
        return cap
    try:
        value = float(asked)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value < float("inf"):
        raise bad_request(f"{param} must be a positive number of seconds.", param=param, code="invalid_timeout")
    return min(value, cap)


class Admission:
    """The Ingress replica's in-flight count against its limit; `in_flight` is the metrics gauge."""

    def __init__(self, in_flight) -> None:
        self.inflight = 0
        self.gauge = in_flight

    @contextlib.contextmanager
    def slot(self, limit: int) -> Iterator[None]:
        if self.inflight >= limit:
            raise ApiError(503, "The server is at capacity; retry shortly.", code="overloaded")
        self.inflight += 1
        self.gauge.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= 1
            self.gauge.set(self.inflight)

    async def run(self, pipeline: ImagePipeline, plan: RequestPlan, timeout: float, limit: int) -> ImageResult:
        """Runs the plan within `timeout` seconds; the deadline travels with it, so the stages drop its work."""
        with self.slot(limit):
            try:
                return await asyncio.wait_for(pipeline.run(plan, time.time() + timeout), timeout=timeout)
            except asyncio.TimeoutError:
                raise deadline_exceeded(timeout) from None

    async def stream(self, pipeline: ImagePipeline, plan: RequestPlan, partial_images: int, timeout: float,
                     limit: int) -> AsyncIterator[StreamItem]:
        """`pipeline.stream` under admission and the request's deadline (which travels with it too)."""
        with self.slot(limit):
            deadline = time.monotonic() + timeout
            items = pipeline.stream(plan, partial_images, time.time() + timeout)
            try:
                while True:
                    try:
                        yield await asyncio.wait_for(anext(items), timeout=deadline - time.monotonic())
                    except StopAsyncIteration:
                        return
                    except asyncio.TimeoutError:
                        raise deadline_exceeded(timeout) from None
            finally:
                await items.aclose()
