"""Device time of denoising steps, without making the host wait for the device.

On CUDA the host returns from a step as soon as its kernels are queued, so host time says little.
Each step is bracketed by two CUDA events and reported once the GPU has passed the second one,
checked at later steps with `Event.query()`; a synchronize per step would stall the next step's
launch. `flush()` waits for what is left, where the host waits anyway (results copied to the CPU)
or is idle. On the CPU host time is exact and is reported at once.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence

import torch

# Called with the number of images a step advanced and the seconds it took.
StepRecorder = Callable[[int, float], None]


class StepTimer:
    def __init__(self, record: StepRecorder):
        self.record = record
        self._pending: collections.deque[tuple[int, torch.cuda.Event, torch.cuda.Event]] = collections.deque()

    def step(self, loop, states: Sequence) -> None:
        """`loop.step(states)` (a DenoiseLoop), timed; runs on the model thread."""
        if loop.device.type != "cuda":
            start = time.perf_counter()
            loop.step(states)
            self.record(len(states), time.perf_counter() - start)
            return
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        loop.step(states)
        end.record()
        self._pending.append((len(states), begin, end))
        self._report(wait=False)

    def flush(self) -> None:
        self._report(wait=True)

    def _report(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][2].query()):
            size, begin, end = self._pending.popleft()
            end.synchronize()
            self.record(size, begin.elapsed_time(end) / 1000)
