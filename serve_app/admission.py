"""Admission and deadlines: how many requests run at once, and how long each may take.

A request over `api.max_inflight_requests` is refused with a 503 at once rather than queued behind
work it would wait for, and before its body is read or its upload decoded, so that a refusal costs
next to nothing while the server is busiest. The 503 says when to come back (serve_app.backlog). An
admitted request runs under its deadline (the client's `X-Request-Timeout` or the handle API's
`timeout_s`, capped by `api.request_timeout_s`); the deadline travels with it to the stages, so the
Denoiser drops its work when it passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from serve_app.backlog import Backlog, plan_work
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


class Ticket:
    """One admitted request's place; `release` gives it back (once, however the request ended)."""

    def __init__(self, admission: Admission, number: int):
        self.admission = admission
        self.number = number
        self.completed = False
        self.released = False
        self.streaming = False  # a started stream's generator owns the ticket and releases it

    def describe(self, plan: RequestPlan) -> None:
        """The request's work, known once its body has been read and planned."""
        work = plan_work(plan.n, plan.width, plan.height, plan.steps, plan.strength, plan.init_image is not None)
        self.admission.backlog.describe(self.number, work)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.backlog.finish(self.number, self.completed)
            self.admission.gauge.set(self.admission.inflight)


class Admission:
    """The Ingress replica's admitted requests against its limit; `in_flight` is the metrics gauge."""

    def __init__(self, in_flight) -> None:
        self.backlog = Backlog()
        self.gauge = in_flight

    @property
    def inflight(self) -> int:
        return len(self.backlog.running)

    def enter(self, limit: int) -> Ticket:
        """A place among the `limit` admitted requests, or a 503 that says when to come back."""
        if self.inflight >= limit:
            raise ApiError(503, "The server is at capacity; retry shortly.", code="overloaded",
                           retry_after_s=self.backlog.retry_after_s())
        ticket = Ticket(self, self.backlog.start())
        self.gauge.set(self.inflight)
        return ticket

    def retry_after_s(self) -> float:
        """For a 503 from a stage (full queue, replica away): the same estimate as for a refusal here."""
        return self.backlog.retry_after_s()

    async def run(self, pipeline: ImagePipeline, plan: RequestPlan, timeout: float, ticket: Ticket) -> ImageResult:
        """Runs the plan within `timeout` seconds; the deadline travels with it, so the stages drop its work."""
        ticket.describe(plan)
        try:
            result = await asyncio.wait_for(pipeline.run(plan, time.time() + timeout), timeout=timeout)
        except asyncio.TimeoutError:
            raise deadline_exceeded(timeout) from None
        ticket.completed = True
        return result

    async def stream(self, pipeline: ImagePipeline, plan: RequestPlan, partial_images: int, timeout: float,
                     ticket: Ticket) -> AsyncIterator[StreamItem]:
        """`pipeline.stream` under the request's deadline (which travels with it too); the generator
        owns `ticket` and releases it when the stream ends."""
        ticket.describe(plan)
        try:
            deadline = time.monotonic() + timeout
            items = pipeline.stream(plan, partial_images, time.time() + timeout)
            try:
                while True:
                    try:
                        yield await asyncio.wait_for(anext(items), timeout=deadline - time.monotonic())
                    except StopAsyncIteration:
                        ticket.completed = True
                        return
                    except asyncio.TimeoutError:
                        raise deadline_exceeded(timeout) from None
            finally:
                await items.aclose()
        finally:
            ticket.release()
