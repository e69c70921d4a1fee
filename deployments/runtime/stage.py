"""What every stage deployment shares: a start lifecycle, live config that merges, a record of batch
sizes, one GPU lane, and one answer to "can this replica serve?".

Deployments stay thin: they own batching, config and metrics; the maths lives beside each shell, in its stage package.

Lifecycle (as LitServe's `setup` before `predict`, one contract for every stage): a stage's
constructor first imports the model code it declares in `model_modules` (its module imports that code
where it is used, so that the builder never loads torch; timed as the start phase `imports`), binds
its settings and calls `start()`, which runs the stage's declared phases in order, each timed as a
start phase (`runtime.start_phases`): `load()` (weights onto the device),
`optimize()` (quantize, wrap for compile and CUDA graphs; nothing runs yet), `warm_up()` (on the
model thread that serves: compile and capture what requests need), then the replica is ready, and
`warm_up_after_ready()`'s calls run in the background, one at a time between requests
(`runtime.background_warmup`). Readiness and health are answered here for every stage alike. The
model stages bind their settings, device and speed through `runtime.model_stage.ModelStage`.

Live config: each stage's `config_model` (a pydantic model) holds the defaults of what may change
while serving. The builder binds every replica to the complete config made from the application's
args (`base_config`) and sends the same as `user_config`. A `user_config` override in a Serve config
file replaces Serve's copy wholesale; `reconfigure()` lays it over `base_config`, so an override
changes only what it names, and removing it brings back the shipped values.
"""

from __future__ import annotations

import collections
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.runtime.background_warmup import BackgroundWarmup, WarmupStep
from deployments.runtime.batching import DynamicBatcher, QueueDrainer
from deployments.runtime.gpu_lane import GpuLane
from deployments.runtime.start_phases import StartPhases
from deployments.runtime.metrics import StageMetrics

BATCH_HISTORY = 1000
LIFECYCLE = ("load", "optimize", "warmup")  # the start phases a stage declares, in the order they run

logger = logging.getLogger("ray.serve")


class StageConfig(BaseModel):
    """Live settings every batched stage has; a stage's own model adds its keys and defaults.

    The batch wait defaults to 0: a batch forms from what queued while the previous one ran, so a
    wait only delays a lone request; it helps only where bursts arrive a little apart.
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=10.0)
    max_model_call_s: float = Field(300.0, gt=0)
    """A model call running longer than this fails the replica's health check (a stuck GPU)."""


def deep_merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """`override` laid over `base`: nested dicts merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class StageStats:
    """Counters a test or a metrics exporter reads through `stats()`."""

    batch_sizes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=BATCH_HISTORY))
    items: int = 0
    batches: int = 0
    busy_s: float = 0.0

    def record(self, size: int, seconds: float) -> None:
        self.batch_sizes.append(size)
        self.items += size
        self.batches += 1
        self.busy_s += seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes),
            "items": self.items,
            "batches": self.batches,
            "busy_s": round(self.busy_s, 4),
        }


class StageBase:
    """Mixin for stage deployments: the start lifecycle (`start`), and each batched method a
    `DynamicBatcher` made by `add_batcher`."""

    config_model: type[StageConfig] = StageConfig
    speed_keys: tuple[str, ...] = ()  # the resolved speed settings this stage applies (`deployments.speed`)
    model_modules: tuple[str, ...] = ()
    """What the `imports` phase imports: modules (`torch`) or a library's attribute (`diffusers:AutoencoderKL`,
    which loads the library's parts for it), so a replica's import time is a figure of its own."""

    def _init_stage(self, name: str, base_config: dict[str, Any] | None = None) -> None:
        self.stage_name = name
        self.stats_by_method: dict[str, StageStats] = collections.defaultdict(StageStats)
        self.base_config = dict(base_config or {})
        self.config = self.config_model.model_validate(self.base_config)
        self.gpu_lane = GpuLane(name)  # one model call at a time per replica, all on one thread
        self.batchers: dict[str, DynamicBatcher] = {}
        self.start_phases = StartPhases()  # each stage times its own start: load, optimize, compile, warm-up
        self.metrics = StageMetrics()
        self.speed = None  # a model stage's `deployments.speed.Speed`, resolved on its own device
        self.after_ready = BackgroundWarmup(self.gpu_lane, None, self._warm_after_ready, name=name)
        self.state = "imports"  # then "starting", one of LIFECYCLE while it runs, then "ready"
        with self.start_phases.phase("imports"):
            self.import_modules()
        self.state = "starting"

    # ---- the lifecycle: what a stage declares (each a no-op unless overridden) ----

    def import_modules(self) -> None:
        """Imports `model_modules` (from `_init_stage`, first in the constructor)."""
        for name in self.model_modules:
            module, _, attribute = name.partition(":")
            imported = importlib.import_module(module)
            if attribute:
                getattr(imported, attribute)

    def load(self) -> None:
        """Reads the stage's weights onto its device (or builds them: `model=random`)."""

    def optimize(self) -> None:
        """Prepares the loaded model for speed: quantization, compile and CUDA-graph wrappers. Runs
        nothing on the device's kernels yet; compiling happens on first calls, in `warm_up`."""

    def warm_up(self) -> None:
        """Runs, on the model thread that serves, every call whose compile or capture a request would
        otherwise pay, so that the replica is ready only when requests meet warm paths."""

    def warm_up_after_ready(self) -> list[WarmupStep]:
        """Calls to warm after the replica reported ready, each on the model thread between requests;
        until they have run (`after_ready.ready`) the stage must take a path that compiles nothing."""
        return []

    def on_warm_after_ready(self, warmup: BackgroundWarmup) -> None:
        """Called on the background thread once every `warm_up_after_ready` call has run."""

    def ready_line(self) -> str:
        """What the stage's one "ready" log line says after its name (device, precision, choices)."""
        return ""

    def start(self) -> None:
        """Runs the lifecycle: `load`, `optimize` (on the constructor's thread), `warm_up` (on the model
        thread), each timed as its start phase; then the replica is ready (logged once, with each
        phase's seconds), and `warm_up_after_ready`'s calls start in the background."""
        for phase, step in zip(LIFECYCLE, (self.load, self.optimize, self._warm_up_on_lane)):
            self.state = phase
            with self.start_phases.phase(phase):
                step()
        self.after_ready.plan(self.warm_up_after_ready())
        self.start_phases.ready()
        self.state = "ready"
        phases = " ".join(f"{k}={v:.1f}" for k, v in self.start_phases.as_dict().items()
                          if v and not k.startswith("warmup_after"))
        logger.info("%s ready: %s (seconds: %s%s)", self.stage_name, self.ready_line(), phases,
                    f"; {len(self.after_ready.steps)} warm-up calls follow in the background"
                    if self.after_ready.steps else "")
        self.serving(expected_compiles=lambda: self.after_ready.running)
        self.after_ready.start()

    def _warm_up_on_lane(self) -> None:
        self.gpu_lane.run_blocking(self.warm_up)  # graphs and cuDNN plans belong to the thread that serves

    def _warm_after_ready(self, warmup: BackgroundWarmup) -> None:
        self.start_phases.add("warmup_after_ready", warmup.lane_seconds)
        self.on_warm_after_ready(warmup)

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"

    def add_batcher(self, method: str, fn: Callable[[list], list], on_gpu: bool = True) -> DynamicBatcher:
        """Batches calls to `fn` (blocking, list in, list out), run off the event loop and recorded."""

        async def run(items: list) -> list:
            if on_gpu:
                return await self.run_model(method, len(items), fn, items)
            start = time.perf_counter()
            results = fn(items)
            self.record_batch(method, len(items), time.perf_counter() - start)
            return results

        batcher = DynamicBatcher(run, self.config.max_batch_size, self.config.batch_wait_timeout_s,
                                 self.metrics.observer(method))
        self.batchers[method] = batcher
        return batcher

    def drainers(self) -> list[QueueDrainer]:
        """The tasks' owners that `aclose` stops: each batcher."""
        return list(getattr(self, "batchers", {}).values())

    async def aclose(self) -> None:
        """Stops the batchers' tasks and waits for them to end (an event loop's owner, before it closes it)."""
        for drainer in self.drainers():
            await drainer.aclose()

    def __del__(self) -> None:
        """Serve's replica shutdown (also garbage collection): the batchers' tasks are cancelled on their
        loop, not left pending."""
        for drainer in self.drainers():
            drainer.close()

    def reconfigure(self, user_config: dict | None) -> None:
        """Serve's live-config hook: `user_config` over the bound `base_config`, validated, then applied.
        Unknown keys fail the update (pydantic's extra="forbid"), so typos do not pass silently."""
        self.config = self.config_model.model_validate(deep_merge(self.base_config, user_config))
        for batcher in self.batchers.values():
            batcher.max_batch_size = self.config.max_batch_size
            batcher.wait_s = self.config.batch_wait_timeout_s
        self.apply_config(self.config)

    def apply_config(self, config: StageConfig) -> None:
        """Stage-specific live settings beyond batching; the default has none."""

    async def run_model(self, method: str, size: int, fn, *args):
        """Runs blocking model code off the event loop, one call at a time, and records the batch."""
        return (await self.run_model_timed(method, size, fn, *args))[0]

    async def run_model_timed(self, method: str, size: int, fn, *args) -> tuple[Any, float]:
        """(`run_model`'s result, seconds it waited for the replica's model thread)."""
        arrived = time.perf_counter()
        async with self.gpu_lane.lock:
            start = time.perf_counter()
            result = await self.gpu_lane.run(fn, *args)
            self.record_batch(method, size, time.perf_counter() - start)
        return result, start - arrived

    def record_batch(self, method: str, size: int, seconds: float) -> None:
        """One model call: into `stats()` and the metrics."""
        self.stats_by_method[method].record(size, seconds)
        self.metrics.batch(method, size, seconds)

    def serving(self, expected_compiles: Callable[[], bool] | None = None) -> None:
        """Called by `start` once ready: warm-up is over, so a compile from now on is a cold path on
        the request path, counted in `zimage_compiles_after_ready` (except while `expected_compiles()`
        is true: a warm-up the stage runs after it reported ready)."""
        self.metrics.watch_compiles(expected_compiles)

    def stats(self) -> dict[str, Any]:
        torch = sys.modules.get("torch")  # PromptStyler never imports it
        gpu = {}
        if torch is not None and torch.cuda.is_available():
            gpu = {
                "gpu_peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                "gpu_peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3),
                "gpu_allocated_gb": round(torch.cuda.memory_allocated() / 2**30, 3),
            }
        return {
            **gpu,
            "stage": self.stage_name,
            "pid": os.getpid(),
            "config": self.config.model_dump(mode="json"),
            "state": self.state,
            "speed": None if self.speed is None else self.speed.as_dict(self.speed_keys),
            "start_phases": self.start_phases.as_dict(),
            "ready_at": self.start_phases.ready_at,
            "warm_after_ready": self.after_ready.as_dict(),
            "methods": {name: s.as_dict() for name, s in self.stats_by_method.items()},
        }

    def reset_stats(self) -> None:
        self.stats_by_method.clear()

    def check_health(self) -> None:
        """Serve's health hook, the same for every stage: fails when the replica never finished its
        start or its model can no longer serve, so Serve replaces it. A warm-up after ready that
        failed does not fail it: the stage keeps its slower path that compiles nothing."""
        problem = None if self.is_ready else f"not started (stopped in {self.state})"
        problem = problem or self.gpu_lane.health_problem(self.config.max_model_call_s)
        if problem:
            raise RuntimeError(f"{self.stage_name}: {problem}")
