"""Retrying stage calls that failed because a replica went away, never a request's own fault.

Every image is seeded, so running its chain again gives the same pixels. A failure counts as the
replica's when Ray or Serve says the actor died or is unreachable, anywhere in the exception's chain
(Serve wraps an upstream death seen at a downstream call in a `RayServeException` whose cause is
the `ActorDiedError`; a stage's own exception arrives as a `RayTaskError` with `.cause`).
Attempts are bounded and back off, and none starts past the request's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

logger = logging.getLogger("ray.serve")

T = TypeVar("T")

# RayActorError covers ActorDiedError and ActorUnavailableError.
REPLICA_FAILURES: tuple[type[BaseException], ...] = (
    RayActorError, WorkerCrashedError, NodeDiedError, DeploymentUnavailableError, ReplicaUnavailableError,
)


def causes(exc: BaseException):
    """`exc` and what it wraps: Ray's `.cause`, then Python's `__cause__`."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        wrapped = getattr(current, "cause", None)
        current = wrapped if isinstance(wrapped, BaseException) else current.__cause__


def is_replica_failure(exc: BaseException) -> bool:
    return any(isinstance(e, REPLICA_FAILURES) for e in causes(exc))


@dataclass(frozen=True)
class RetryPolicy:
    """Up to `attempts` tries; waits `first_backoff_s`, doubling up to `max_backoff_s`, between them."""

    attempts: int = 6
    first_backoff_s: float = 0.5
    max_backoff_s: float = 4.0

    def backoff_s(self, attempt: int) -> float:
        return min(self.first_backoff_s * 2**attempt, self.max_backoff_s)

    async def run(self, call: Callable[[int], Awaitable[T]], deadline: float | None = None, what: str = "call") -> T:
        """`call(attempt)` until it succeeds, fails for another reason, or attempts or time run out.
        `deadline` is wall-clock (`time.time()`); a retry that could not start before it is not made."""
        attempt = 0
        while True:
            try:
                return await call(attempt)
            except Exception as exc:
                wait = self.backoff_s(attempt)
                attempt += 1
                out_of_time = deadline is not None and time.time() + wait >= deadline
                if not is_replica_failure(exc) or attempt >= self.attempts or out_of_time:
                    raise
                logger.warning("%s failed because a replica went away (%s); retry %d in %.1fs",
                               what, type(exc).__name__, attempt, wait)
                await asyncio.sleep(wait)
