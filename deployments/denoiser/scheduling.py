"""How the Denoiser turns concurrent requests into DiT calls. Plain asyncio, no Ray.

Three policies, chosen in config (`denoiser_scheduling`):
- `single`: one request at a time, start to finish;
- `batch`: requests that arrive together run as one batch to completion, grouped by resolution;
- `continuous`: step-level continuous batching. Requests join the running batch between steps and
  leave it as soon as their own last step is done, each at its own timestep; running work is
  bucketed by resolution and buckets take turns step by step. A request whose caller went away is
  dropped at the next step boundary. Waiting requests join by weighted fair share between tenants
  (`DenoiseRequest.tenant`; deployments/runtime/fair_share.py, each job costing its megapixel-steps),
  so one tenant's flood does not hold back another's next job; a tenant's jobs of one size keep
  their order, and a job in the running batch is never taken out of it for another.
Under every policy a job past its deadline (`DenoiseJob.deadline`) is dropped before it starts or
at the next step boundary, and its caller gets `DeadlineExceeded`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from deployments.denoiser.policies import POLICIES, SchedulingPolicy  # noqa: F401 (named here too)
from deployments.runtime.batching import BatchObserver, Queued, QueueDrainer
from deployments.contracts import DenoiseJob, Latents
from deployments.runtime.deadlines import DeadlineExceeded, past
from deployments.denoiser.loop import DenoiseLoop, DenoiseState
from deployments.runtime.fair_share import FairShare
from deployments.runtime.gpu_lane import GpuLane
from deployments.denoiser.pending_work import job_steps, step_cost
from deployments.denoiser.step_timer import StepRecorder, StepTimer

logger = logging.getLogger(__name__)

# A StepRecorder hears each batched step's image count and device seconds (with
# `DenoiseLoop.batch_invariant`, the CPU default, a step makes one DiT call per job; see denoising.py).


def group_by_resolution(jobs: Sequence[DenoiseJob]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault((job.width, job.height), []).append(index)
    return groups


def run_grouped(loop: DenoiseLoop, jobs: Sequence[DenoiseJob], record: StepRecorder) -> list[Latents | Exception]:
    """The `batch` policy's body: each resolution group runs to completion as one batch; a job
    whose deadline passes leaves it (before its first step, or between steps)."""
    results: list[Latents | Exception] = [ValueError("not run")] * len(jobs)
    timer = StepTimer(record)

    def expired(i: int, state: DenoiseState | None = None) -> bool:
        if (state is None or not state.done) and past(jobs[i].deadline):
            results[i] = DeadlineExceeded()
            return True
        return False

    for indices in group_by_resolution(jobs).values():
        states: list[tuple[int, DenoiseState]] = []
        for i in indices:
            if expired(i):
                continue
            try:
                states.append((i, loop.start(jobs[i])))
            except Exception as exc:  # a bad job fails alone
                results[i] = exc
        while True:
            states = [(i, s) for i, s in states if not expired(i, s)]
            active = [s for _, s in states if not s.done]
            if not active:
                break
            timer.step(loop, active)
        for i, state in states:
            try:
                results[i] = state.result()
            except Exception as exc:
                results[i] = exc
    timer.flush()
    return results


@dataclass
class _Entry(Queued):
    state: DenoiseState | None = None

    @property
    def job(self) -> DenoiseJob:
        return self.item


class ContinuousBatcher(QueueDrainer):
    """Step-level continuous batching over one DenoiseLoop, driven by a single background task."""

    def __init__(self, loop: DenoiseLoop, max_batch_size: int, record: StepRecorder, lane: GpuLane | None = None,
                 observer: BatchObserver | None = None):
        super().__init__(observer)  # `submit_timed(job)`: (latents, seconds before it joined the batch)
        self.loop = loop
        self.max_batch_size = max_batch_size
        self.timer = StepTimer(record)
        self.lane = lane or GpuLane("denoise")
        self.running: dict[tuple[int, int], list[_Entry]] = {}
        self._turns: collections.deque[tuple[int, int]] = collections.deque()
        self.waiting: FairShare[_Entry] = FairShare()  # arrivals move here from `queue` before each step
        self.cancelled = 0

    def _queued(self, job: DenoiseJob, future: asyncio.Future) -> _Entry:
        return _Entry(job, future, time.monotonic())

    async def aclose(self) -> None:
        """QueueDrainer's, and the jobs waiting or running are cancelled too."""
        await super().aclose()
        for entry in self.waiting.remove(lambda entry: True) + [e for es in self.running.values() for e in es]:
            if not entry.future.done():
                entry.future.cancel()
        self.running.clear()
        self._turns.clear()

    def queued_jobs(self) -> list[DenoiseJob]:
        """Jobs waiting to join the running batch (their callers still there)."""
        waiting = list(self.queue) + self.waiting.items()  # each copy one step: safe from a thread
        return [e.job for e in waiting if not e.future.done()]

    def running_jobs(self) -> list[tuple[DenoiseJob, int]]:
        """(job, steps it has left) for each job in the running batch."""
        return [(e.job, job_steps(e.job) if e.state is None else e.state.total_steps - e.state.step_index)
                for entries in list(self.running.values()) for e in list(entries) if not e.future.done()]

    def _admit(self) -> list[_Entry]:
        """Arrivals join their tenant's queue; then, in fair order, every waiting job whose size has
        room in the running batch joins it."""
        while self.queue:
            entry = self.queue.popleft()
            job = entry.job
            self.waiting.push(job.tenant.name, entry, job_steps(job) * step_cost(job), job.tenant.weight)
        gone = self.waiting.remove(lambda entry: entry.future.done())  # the caller went away while waiting
        if gone:
            self._cancel(len(gone))
        self.waiting.remove(self._expire)

        def has_room(entry: _Entry) -> bool:
            return len(self.running.get((entry.job.width, entry.job.height), [])) < self.max_batch_size

        admitted = []
        while (entry := self.waiting.pop(has_room)) is not None:
            bucket = (entry.job.width, entry.job.height)
            self.running.setdefault(bucket, []).append(entry)
            if bucket not in self._turns:
                self._turns.append(bucket)
            admitted.append(entry)
        now = time.monotonic()
        for entry in admitted:
            entry.started = now
        self.observer.waiting(len(self.waiting))
        self.observer.admitted([now - entry.arrived for entry in admitted])
        self.observer.running(sum(len(entries) for entries in self.running.values()))
        return admitted

    def _expire(self, entry: _Entry) -> bool:
        """Fails a job whose deadline passed (waiting, or running between steps); True if it did."""
        if entry.future.done() or not past(entry.job.deadline):
            return False
        _fail(entry.future, DeadlineExceeded())
        return True

    def _cancel(self, count: int) -> None:
        self.cancelled += count
        self.observer.cancelled(count)

    def _next_bucket(self) -> tuple[int, int] | None:
        while self._turns:
            bucket = self._turns[0]
            self._turns.rotate(-1)
            if self.running.get(bucket):
                return bucket
            self._turns.remove(bucket)
            self.running.pop(bucket, None)
        return None

    def _start_states(self, entries: list[_Entry]) -> None:
        for entry in entries:
            try:
                entry.state = self.loop.start(entry.job)
            except Exception as exc:
                self.observer.failed(1)
                if not entry.future.done():
                    entry.future.get_loop().call_soon_threadsafe(_fail, entry.future, exc)

    async def _drive(self) -> None:
        while True:
            if not self.queue and not self.waiting and not any(self.running.values()):
                self._arrival.clear()
                await self._arrival.wait()
            admitted = self._admit()
            bucket = self._next_bucket()
            if bucket is None:
                continue
            entries = [e for e in self.running[bucket] if not self._expire(e)]
            try:
                async with self.lane.lock:
                    if admitted:
                        await self.lane.run(self._start_states, admitted)
                    live = [e for e in entries if e.state is not None and not e.future.done()]
                    if live:
                        await self.lane.run(self.timer.step, self.loop, [e.state for e in live])
            except Exception as exc:  # a failed step fails that bucket's requests, not the server
                logger.exception("denoise step failed for bucket %s", bucket)
                self.observer.failed(sum(not entry.future.done() for entry in entries))
                for entry in entries:
                    _fail(entry.future, exc)
            remaining = []
            for entry in entries:
                if entry.future.done():
                    if entry.future.cancelled():
                        self._cancel(1)
                    continue
                if entry.state is not None and entry.state.done:
                    try:
                        entry.future.set_result(entry.state.result())
                    except Exception as exc:
                        self.observer.failed(1)
                        entry.future.set_exception(exc)
                    continue
                remaining.append(entry)
            self.running[bucket] = remaining
            if not self.queue and not self.waiting and not any(self.running.values()):
                self.observer.running(0)
                await self.lane.run(self.timer.flush)  # idle: the last steps' device times


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
