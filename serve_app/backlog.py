"""When to come back: `Retry-After` for a refused request, from the work queued ahead of it and the
rate at which that work has recently been done.

Work is counted as the Denoiser counts its pending work (deployments/denoiser/pending_work.py): in
megapixel-steps, one denoising step of one 1024x1024 image. This Ingress replica knows the work of
every request it admitted (from the request's plan) and when each finished, so it measures the
step rate at which its admitted work completes (megapixel-steps per second of busy time over the
last `window_s`) and estimates a refused request's wait as

    time until an admitted request finishes (each progresses at rate / admitted, as the Denoiser's
    continuous batches run them side by side)
  + one request's mean work / rate for every refused client already told to come back earlier

so that the clients it refuses come back spread over the slots as they free, not all at once. The
wait is clamped to [`min_s`, `max_s`]; before any request has finished there is no rate, and a
refused client is told `min_s`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from deployments.denoiser.pending_work import REFERENCE_PIXELS


def plan_work(n: int, width: int, height: int, steps: int, strength: float, edit: bool) -> float:
    """A request's Denoiser work in megapixel-steps: an edit runs only its last `steps * strength` steps."""
    from deployments.denoiser.loop import first_step_index  # the loop's torch: a replica's, not the builder's

    run = steps - first_step_index(steps, strength) if edit else steps
    return n * run * width * height / REFERENCE_PIXELS


@dataclass
class Running:
    work: float
    started: float  # time.monotonic()


@dataclass
class Backlog:
    window_s: float = 30.0
    min_s: float = 0.5
    max_s: float = 60.0
    running: dict[int, Running] = field(default_factory=dict)
    done: deque = field(default_factory=deque)  # (finished at, work, busy clock then)
    promised: deque = field(default_factory=deque)  # times refused clients were told to come back
    busy_s: float = 0.0  # time with at least one admitted request: the rate's denominator
    _busy_since: float | None = None
    _next_id: int = 0

    def _tick(self, now: float) -> None:
        if self._busy_since is not None:
            self.busy_s += now - self._busy_since
            self._busy_since = now if self.running else None
        elif self.running:
            self._busy_since = now

    def start(self) -> int:
        """An admitted request; its work is set with `describe` once its body has been read."""
        now = time.monotonic()
        self._tick(now)
        self._next_id += 1
        self.running[self._next_id] = Running(0.0, now)
        self._tick(now)
        return self._next_id

    def describe(self, ticket: int, work: float) -> None:
        if ticket in self.running:
            self.running[ticket].work = work

    def finish(self, ticket: int, completed: bool) -> None:
        """`completed`: its images were made, so its work counts towards the rate."""
        now = time.monotonic()
        self._tick(now)
        entry = self.running.pop(ticket, None)
        if entry is not None and completed and entry.work > 0:
            self.done.append((now, entry.work, self.busy_s))
        self._tick(now)
        while len(self.done) > 2 and self.done[0][0] < now - self.window_s:
            self.done.popleft()

    def rate(self) -> float | None:
        """Megapixel-steps per busy second between the window's first and last completions (the last
        two when the window holds fewer); None until two requests have finished."""
        if len(self.done) < 2:
            return None
        busy = self.done[-1][2] - self.done[0][2]
        work = sum(w for _, w, _ in list(self.done)[1:])
        return work / busy if busy > 0 else None

    def mean_work(self) -> float:
        works = [w for _, w, _ in self.done] or [r.work for r in self.running.values() if r.work > 0]
        return sum(works) / len(works) if works else 0.0

    def _first_free(self, entries: list[Running], rate: float, now: float) -> float:
        """Seconds until the first of `entries` finishes, each progressing at rate / admitted."""
        mean = self.mean_work()
        share = rate / max(1, len(self.running))
        return min((max(0.0, (r.work or mean) / share - (now - r.started)) for r in entries), default=0.0)

    def first_free_s(self, tickets) -> float:
        """When the first of these admitted requests should finish (one key's: its place frees then),
        clamped as `retry_after_s`; it counts no refused client as told."""
        rate = self.rate()
        if rate is None:
            return self.min_s
        entries = [self.running[t] for t in tickets if t in self.running]
        return min(self.max_s, max(self.min_s, self._first_free(entries, rate, time.monotonic())))

    def retry_after_s(self) -> float:
        """The wait to tell a refused client; each call counts it as told (see the module's text)."""
        now = time.monotonic()
        self.promised = deque(t for t in self.promised if t > now)
        rate = self.rate()
        if rate is None:
            return self.min_s
        mean = self.mean_work()
        first_free = self._first_free(list(self.running.values()), rate, now)
        wait = first_free + len(self.promised) * mean / rate
        wait = min(self.max_s, max(self.min_s, wait))
        self.promised.append(now + wait)
        return wait

