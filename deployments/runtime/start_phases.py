"""Where a replica's start goes, in seconds: the stage lifecycle's phases and what hides inside them.

`StageBase.start` runs `imports`, `load`, `optimize` and `warmup` (the stage's own code) and times each here.
Two kinds of work happen inside other phases and are moved out into phases of their own, read from
process-wide counters, so that each figure says what it costs:
- `compile`: torch.compile's dynamo/inductor time (a compiled module compiles on its first call,
  during the warm-up); with a warm compile cache it shrinks to the cache loads and dynamo's tracing,
  which is what a fast start shows. `compile_dynamo` says how much of it was dynamo's own (tracing
  and guards: no cache of compiled code saves it); it is part of `compile`, not added to it;
- `random_init`: building the full-size architecture with random weights (`model=random`), which
  real weights do not pay (they pay reading their files instead, inside `load`).

`warmup_after_ready` is what a stage warms after it reported ready (`runtime.background_warmup`):
its model-thread seconds, compile included, so the phases before it add up to the start and it adds
the time until every path is warm. `warmup_shapes` likewise, for the Denoiser's second one: a CUDA
graph per caption bucket and first forwards at the preset sizes (`denoiser.dit.size_warmup`). `ready` is the stage's start from its constructor to ready, and
`process` from the replica process's start (Ray's worker, imports) to ready: the difference is what
no phase of ours covers.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from deployments.runtime.compile_counters import CompileCounts

PHASES = ("imports", "load", "random_init", "optimize", "compile", "warmup")
OF_WHICH = ("compile_dynamo",)  # part of a phase above, said apart
AFTER_READY = ("warmup_after_ready", "warmup_shapes")
TOTALS = ("ready", "process")


def compile_seconds() -> float:
    """Seconds torch.compile has spent in this process so far (dynamo's `_compile.compile_inner`)."""
    return CompileCounts.read().compile_s


def dynamo_seconds() -> float:
    """Of `compile_seconds`, dynamo's own (tracing and guards; the rest is AOTAutograd and inductor)."""
    return CompileCounts.read().dynamo_s


def random_init_seconds() -> float:
    """Seconds this process has spent building random-weight models (`weights.loading`; read only
    where a stage imported it, so that a stage without a model never imports torch for it)."""
    loading = sys.modules.get("deployments.weights.loading")
    return loading.random_init_seconds() if loading is not None else 0.0


def process_age_seconds() -> float | None:
    """Seconds since this process started (psutil comes with Ray); None where it cannot be read."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:
        return None


# Phases whose seconds are read from a process-wide counter and moved out of whatever phase ran them.
MOVED: dict[str, Callable[[], float]] = {"compile": compile_seconds, "random_init": random_init_seconds}


class StartPhases:
    def __init__(self) -> None:
        self.seconds: dict[str, float | None] = dict.fromkeys(PHASES + OF_WHICH + AFTER_READY, 0.0)
        self.seconds.update(dict.fromkeys(TOTALS))
        self.started = time.perf_counter()
        self.ready_at: float | None = None  # wall-clock (time.time()) of ready, to line up with Ray's records

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the block as `name`, less what the moved counters (compile, random_init) spent in it."""
        if name not in PHASES or name in MOVED:
            raise ValueError(f"unknown start phase {name!r}; one of {[p for p in PHASES if p not in MOVED]}")
        before, start = {key: read() for key, read in MOVED.items()}, time.perf_counter()
        dynamo_before = dynamo_seconds()
        try:
            yield
        finally:
            self.seconds["compile_dynamo"] += dynamo_seconds() - dynamo_before
            elapsed = time.perf_counter() - start
            for key, read in MOVED.items():
                moved = read() - before[key]
                self.seconds[key] += moved
                elapsed -= moved
            self.seconds[name] += elapsed

    def ready(self) -> None:
        """The stage reported ready: its start from the constructor, and from the process's start."""
        self.seconds["ready"] = time.perf_counter() - self.started
        self.seconds["process"] = process_age_seconds()
        self.ready_at = time.time()

    def add(self, name: str, seconds: float) -> None:
        """Seconds of a phase timed elsewhere (one that runs after the replica reported ready)."""
        if name not in AFTER_READY:
            raise ValueError(f"unknown after-ready phase {name!r}; one of {AFTER_READY}")
        self.seconds[name] += seconds

    def as_dict(self) -> dict[str, float | None]:
        return {f"{name}_s": None if value is None else round(value, 3) for name, value in self.seconds.items()}
