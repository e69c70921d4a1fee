"""The warm-up a replica runs after it reports ready, on its model thread, between requests.

Why: with a warm compile cache most of a new Denoiser's start went to tracing the graphs of batches
over one image (equal and ragged captions, several seconds each even when inductor's caches hold
the compiled code), while a replica that runs every forward at batch 1 needs none of them; and most
of the VaeDecoder's cold start went to compiling its dynamic graph for sizes no warm-up size covers,
while those sizes decode correctly (more slowly) without it. So a stage reports ready once what its
common requests need is warm (`StageBase.warm_up`) and warms the rest here
(`StageBase.warm_up_after_ready`). Until `ready` is set the stage takes a path that compiles nothing
(the Denoiser runs each image of a batch as its own forward, the VAE decodes such sizes eagerly), so
nothing compiles on the request path in the meantime.

Each call is its own job on the replica's `GpuLane`: the lane's one thread runs model work one call
at a time, so a warm-up call never overlaps a request's model call (nor makes its cuDNN plans on
another thread), and a request's work submitted while a warm-up call runs goes before the next
warm-up call. A request waits at most one warm-up call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from deployments.runtime.gpu_lane import GpuLane

logger = logging.getLogger(__name__)

WarmupStep = tuple[str, Callable[[], Any]]  # (key, a blocking call for the model thread)


class BackgroundWarmup:
    """Runs `steps` in a background thread, each as one call on `lane`; `ready` is set when all have
    run (at once when there are none), just after `on_ready(self)`. A failed step stops the warm-up
    and leaves `ready` unset: the stage keeps the path that compiles nothing, slower but correct."""

    def __init__(self, lane: GpuLane, steps: Sequence[WarmupStep] | None = (),
                 on_ready: Callable[["BackgroundWarmup"], None] | None = None, name: str = "background"):
        """`steps` None: not known yet (`plan` gives them), and `ready` stays unset until then."""
        self.lane = lane
        self.name = name
        self.steps: list[WarmupStep] = []
        self.on_ready = on_ready
        self.ready = threading.Event()
        self.running = False  # a warm-up call is on the model thread now: its compiles are expected
        self.timings: dict[str, float] = {}
        self.lane_seconds = 0.0  # model-thread time of the calls run so far
        self.wall_seconds: float | None = None  # from start() until ready
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        if steps is not None:
            self.plan(steps)

    def plan(self, steps: Sequence[WarmupStep]) -> None:
        """The calls to run (`ready` at once when there are none); before `start`."""
        self.steps = list(steps)
        if not self.steps:
            self.ready.set()

    def start(self) -> None:
        if self.ready.is_set() or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run_all, name="background-warmup", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)

    def _timed(self, fn: Callable[[], Any]) -> float:  # on the model thread
        self.running = True
        start = time.perf_counter()
        try:
            fn()
        finally:
            self.running = False
        return time.perf_counter() - start

    def _run_all(self) -> None:
        started = time.perf_counter()
        for key, fn in self.steps:
            try:
                seconds = self.lane.run_blocking(self._timed, fn)
            except Exception as exc:
                self.error = f"{key}: {type(exc).__name__}: {exc}"
                logger.exception("%s warm-up after ready failed at %s; the stage keeps the path that compiles "
                                 "nothing (slower, correct)", self.name, key)
                return
            self.timings[key] = round(seconds, 4)
            self.lane_seconds += seconds
        self.wall_seconds = time.perf_counter() - started
        if self.on_ready is not None:
            try:
                self.on_ready(self)
            except Exception:  # reporting must not keep the batched graphs unused
                logger.exception("on_ready of the background warm-up failed")
        self.ready.set()
        logger.info("%s warm-up after ready done in %.1fs (%.1fs on the model thread, %d calls)",
                    self.name, self.wall_seconds, self.lane_seconds, len(self.steps))

    def as_dict(self) -> dict[str, Any]:
        return {
            "ready": self.ready.is_set(),
            "calls": len(self.steps),
            "calls_done": len(self.timings),
            "lane_s": round(self.lane_seconds, 3),
            "wall_s": None if self.wall_seconds is None else round(self.wall_seconds, 3),
            "error": self.error,
            "timings": dict(self.timings),
        }
