"""Readiness from Serve's control plane, never from the data plane.

Asking each stage `ready()` is an ordinary request: it queues behind real work and is refused when
a stage's queue is full, so a busy server looked down. Instead a thread of the Ingress replica reads
`serve.status()` (the controller's view of every deployment, one control-plane call) every
`refresh_s`, and `/health/ready` answers from that snapshot at once. A stage
is ready when it has at least one RUNNING replica (constructed, model loaded, health checks passed).
A snapshot older than `stale_s` (the controller is unreachable) counts as not ready.

The snapshot also counts each deployment's RUNNING replicas: the Ingress divides its keys' limits
and its release window by them (serve_app.tenants).

A snapshot that says not ready is read again before the answer (`check`): otherwise the route said
503 for up to `refresh_s` plus a status read after the controller (and `serve run`'s "is ready" line)
said every stage was running. Only a not-ready server pays that read, one at a time; a ready one
answers from the snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Readiness:
    stages: dict[str, bool] = field(default_factory=dict)
    taken_at: float = 0.0  # time.monotonic() of the status read; 0 = none yet
    replicas: dict[str, int] = field(default_factory=dict)  # RUNNING replicas of each of the app's deployments

    def running(self, deployment: str) -> int:
        """Its RUNNING replicas, at least 1 (this one, before the first read)."""
        return max(1, self.replicas.get(deployment, 1))

    def ready(self, stale_s: float) -> bool:
        fresh = self.taken_at > 0 and time.monotonic() - self.taken_at <= stale_s
        return fresh and bool(self.stages) and all(self.stages.values())


def read_readiness(app_name: str, stage_names: list[str]) -> Readiness:
    from ray import serve

    app = serve.status().applications.get(app_name)
    deployments = app.deployments if app is not None else {}

    replicas = {name: status.replica_states.get("RUNNING", 0) for name, status in deployments.items()}
    return Readiness({name: replicas.get(name, 0) > 0 for name in stage_names}, time.monotonic(), replicas)


@dataclass(eq=False)
class ReadinessProbe:
    """Keeps a fresh `Readiness` snapshot in a daemon thread, started on construction; `current`
    never blocks. `read` is how a snapshot is taken (a test passes its own control plane)."""

    app_name: str
    stage_names: list[str]
    refresh_s: float = 1.0
    stale_s: float = 10.0
    read: Callable[[str, list[str]], Readiness] = read_readiness
    read_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        self._rereading = asyncio.Lock()
        self.current = Readiness({name: False for name in self.stage_names})
        threading.Thread(target=self._poll, name="readiness", daemon=True).start()

    def _poll(self) -> None:
        while True:
            self._refresh()
            time.sleep(self.refresh_s)

    def _refresh(self) -> None:
        try:
            snapshot = self.read(self.app_name, self.stage_names)
        except Exception as exc:  # the controller is away: the snapshot ages into not-ready
            logger.warning("readiness: could not read serve.status(): %s", exc)
            return
        if snapshot.taken_at >= self.current.taken_at:  # the poller and `check` may cross
            self.current = snapshot

    async def check(self) -> Readiness:
        """The snapshot if it says ready; else one read now (off the event loop, bounded), so that
        ready is answered as soon as the controller has every stage running."""
        if self.current.ready(self.stale_s):
            return self.current
        seen = self.current
        async with self._rereading:  # callers that queued here share the read made meanwhile
            if self.current is seen:
                try:
                    await asyncio.wait_for(asyncio.to_thread(self._refresh), timeout=self.read_timeout_s)
                except asyncio.TimeoutError:
                    pass
        return self.current
