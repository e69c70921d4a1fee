"""Where a replica's start goes: load, quantize, compile, warm-up, in seconds.

Compilation happens inside other phases (a compiled module compiles on its first call, during the
warm-up), so each phase's dynamo/inductor time, read from torch's own counter, is moved to `compile`:
with a warm compile cache `compile_s` shrinks to the cache loads, and that is what a fast start shows.

`warmup_batched` is what a replica warms after it reported ready (the Denoiser's graphs of batches
over one image, `deployments.denoiser.batched_warmup`): its model-thread seconds, compile included, so
the phases before it add up to the start and it adds the time until batches run batched.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

PHASES = ("load", "quantize", "compile", "warmup")
AFTER_READY = ("warmup_batched", "warmup_shapes")


def compile_seconds() -> float:
    """Seconds torch.compile has spent in this process so far (dynamo's `_compile.compile_inner`)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # a torch without dynamo compiles nothing
        return 0.0
    return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))


class StartPhases:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES + AFTER_READY, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the block as `name`, less what torch.compile spent in it (counted as `compile`)."""
        if name not in PHASES:
            raise ValueError(f"unknown start phase {name!r}; one of {PHASES}")
        compiled_before, start = compile_seconds(), time.perf_counter()
        try:
            yield
        finally:
            compiled = compile_seconds() - compiled_before
            self.seconds[name] += time.perf_counter() - start - compiled
            self.seconds["compile"] += compiled

    def add(self, name: str, seconds: float) -> None:
        """Seconds of a phase timed elsewhere (one that runs after the replica reported ready)."""
        if name not in AFTER_READY:
            raise ValueError(f"unknown after-ready phase {name!r}; one of {AFTER_READY}")
        self.seconds[name] += seconds

    def as_dict(self) -> dict[str, float]:
        return {f"{name}_s": round(self.seconds[name], 3) for name in PHASES + AFTER_READY}
