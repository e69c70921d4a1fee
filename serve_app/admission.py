"""Admission and deadlines: how many requests run at once, whose they are, and how long each may take.

A request over its key's limits gets a 429 (serve_app.tenants.ledger), and one over
`api.max_inflight_requests` a 503, at once rather than queued behind work it would wait for, and
before its body is read or its upload decoded, so that a refusal costs next to nothing while the
server is busiest. Either says when to come back (serve_app.backlog). An admitted request waits in
the Ingress until the fair release sends it on (serve_app.tenants.release), then runs, and holds its
room in the release window until it is answered, its response encoded (the Ingress's encoding
threads are a first-come queue too); the wait and the run are under its deadline (the client's `X-Request-Timeout` or the handle API's `timeout_s`,
capped by `api.request_timeout_s`), which travels with it to the stages, so the Denoiser drops its
work when it passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from serve_app.backlog import Backlog, plan_work
from serve_app.errors import ApiError, bad_request, deadline_exceeded
from serve_app.pipeline import ImagePipeline, RequestPlan
from serve_app.protocol import ImageResult
from serve_app.streaming import StreamItem
from serve_app.tenants.keys import Tenant
from serve_app.tenants.ledger import Ledger
from serve_app.tenants.release import ReleaseGate

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

    def __init__(self, admission: Admission, number: int, tenant: Tenant, held_images: int):
        self.admission = admission
        self.number = number
        self.tenant = tenant
        self.held_images = held_images  # of the key's minute: one at admission, all `n` once planned
        self.planned = False
        self.work = 0.0  # megapixel-steps, once planned
        self.images = 1  # its `n`, once planned
        self.sent_on = False  # released into the pipeline: its room in the window is held until `release`
        self.completed = False
        self.released = False
        self.streaming = False  # a started stream's generator owns the ticket and releases it

    def describe(self, plan: RequestPlan) -> None:
        """The request's work, known once its body has been read and planned; the rest of its images
        are taken from its key's minute (a 429 if they are not there)."""
        self.work = plan_work(plan.n, plan.width, plan.height, plan.steps, plan.strength, plan.init_image is not None)
        self.images = plan.n
        self.admission.backlog.describe(self.number, self.work)
        self.held_images = self.admission.ledger.take_images(self.tenant, plan.n, self.held_images)
        self.planned = True

    async def send_on(self) -> None:
        """Waits for the fair release into the pipeline (serve_app.tenants.release)."""
        await self.admission.gate.acquire(self.tenant, self.work, self.images)
        self.sent_on = True

    def release(self) -> None:
        """The request was answered (or failed): its places, and its room in the release window, go back."""
        if not self.released:
            self.released = True
            if self.sent_on:
                self.admission.gate.leave(self.images)
            self.admission.backlog.finish(self.number, self.completed)
            self.admission.ledger.leave(self.tenant, self.number, 0 if self.planned else self.held_images)
            self.admission.gauge.set(self.admission.inflight)


class Admission:
    """The Ingress replica's admitted requests against its limit and their keys' limits, and their fair
    release into the pipeline; `in_flight` is the metrics gauge."""

    def __init__(self, in_flight, on_refusal: Callable[[str, str], None] = lambda key, reason: None,
                 gate: ReleaseGate | None = None) -> None:
        """`on_refusal(key name, reason)`: the metrics' hook for every refusal (serve_app.tenants.ledger)."""
        self.backlog = Backlog()
        self.gauge = in_flight
        self.ledger = Ledger(on_refusal, self.backlog.first_free_s)
        self.gate = gate or ReleaseGate()

    @property
    def inflight(self) -> int:
        return len(self.backlog.running)

    def enter(self, limit: int, tenant: Tenant) -> Ticket:
        """A place among the `limit` admitted requests and among its key's, or a 429 (the key's limit)
        or a 503 (the replica's) that says when to come back."""
        self.ledger.check(tenant)
        if self.inflight >= limit:
            self.ledger.refuse_capacity(tenant)
            raise ApiError(503, "The server is at capacity; retry shortly.", code="overloaded",
                           retry_after_s=self.backlog.retry_after_s())
        number = self.backlog.start()
        ticket = Ticket(self, number, tenant, self.ledger.admit(tenant, number))
        self.gauge.set(self.inflight)
        return ticket

    def retry_after_s(self) -> float:
        """For a 503 from a stage (full queue, replica away): the same estimate as for a refusal here."""
        return self.backlog.retry_after_s()

    async def run(self, pipeline: ImagePipeline, plan: RequestPlan, timeout: float, ticket: Ticket) -> ImageResult:
        """Waits for the fair release, then runs the plan, both within `timeout` seconds; the deadline
        travels with it, so the stages drop its work."""
        ticket.describe(plan)
        plan = replace(plan, tenant=ticket.tenant.tag())
        deadline = time.time() + timeout

        async def released_run() -> ImageResult:
            await ticket.send_on()
            return await pipeline.run(plan, deadline)

        try:
            result = await asyncio.wait_for(released_run(), timeout=timeout)
        except asyncio.TimeoutError:
            raise deadline_exceeded(timeout) from None
        ticket.completed = True
        return result

    async def stream(self, pipeline: ImagePipeline, plan: RequestPlan, partial_images: int, timeout: float,
                     ticket: Ticket) -> AsyncIterator[StreamItem]:
        """`pipeline.stream` under the request's deadline (which travels with it too); the generator
        owns `ticket` and releases it when the stream ends."""
        try:
            ticket.describe(plan)
            deadline = time.monotonic() + timeout
            try:
                await asyncio.wait_for(ticket.send_on(), timeout=timeout)
            except asyncio.TimeoutError:
                raise deadline_exceeded(timeout) from None
            items = pipeline.stream(replace(plan, tenant=ticket.tenant.tag()), partial_images,
                                    time.time() + deadline - time.monotonic())
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
