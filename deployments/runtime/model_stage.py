"""What the model stages (TextEncoder, Denoiser, VaeDecoder) share beyond `StageBase`: the `model`
settings bound to the replica's own device, the speed choices resolved there, and the shape of their
Serve options. PromptStyler, on the CPU with no model, is a plain `StageBase`."""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.runtime.compile_cache import CompileCache, compile_cache_status
from deployments.runtime.compile_counters import CompileCounts
from deployments.runtime.stage import StageBase
from deployments.settings import ModelSettings
from deployments.speed import STAGE_CHOICES, StagePart

STAGE_CPUS = 0.25  # a model stage's CPU share: its event loop and the launches of its model thread
QUEUED_PER_ONGOING = 8  # a replica queues up to this many times the requests it takes at once
HEALTH_CHECK_PERIOD_S = 2.0
"""How often Serve's controller calls `check_health` (Serve's default: 10 s). The controller learns that a
replica's process died from this call's failure, and only then starts the replacement: every second
here is a second more that the stage's requests wait (they queue at the callers' handles meanwhile,
or go to a surviving replica). The check reads the model thread's state, so it costs nothing."""


def model_stage_deployment(name: str, *, num_gpus: float, max_ongoing_requests: int,
                           graceful_shutdown_timeout_s: float = 30):
    """Serve's `deployment` decorator with a model stage's options: a CPU share, a fraction of one GPU
    (`num_gpus`; the builder sets 0 where no GPU is in use), the requests it takes at once and queues
    (`QUEUED_PER_ONGOING` times as many), and how long a replica Serve stops may take to finish its
    queued and running work, and how soon a dead replica is noticed (`HEALTH_CHECK_PERIOD_S`).
    serve_config.yaml's standard fields override any of them."""
    return serve.deployment(
        name=name,
        ray_actor_options={"num_cpus": STAGE_CPUS, "num_gpus": num_gpus},
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=QUEUED_PER_ONGOING * max_ongoing_requests,
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
    )


class ModelStage(StageBase):
    """A stage that runs part of the model. Serve constructs it with the application's `model` settings
    (a `ModelSettings` dict) and its bound live config; it binds them to its device, then starts."""

    model_modules = ("torch", "deployments.weights.loading")

    speed_part: StagePart
    """Its key in `Speed.summary`, in `STAGE_CHOICES` and in each result's `speed` (what ran, by stage)."""

    def __init__(self, settings: dict, base_config: dict | None = None) -> None:
        self._init_model_stage(settings, base_config)
        self.start()

    @property
    def speed_keys(self) -> tuple[str, ...]:
        return STAGE_CHOICES[self.speed_part]

    def _init_model_stage(self, settings: dict, base_config: dict | None = None) -> None:
        """The settings, weight source, device, dtype and the speed choices resolved on that device,
        for `start` (a stage with more to set up before its start calls this, then `start`)."""
        self._init_stage(type(self).__name__, base_config)
        self.settings = ModelSettings(**settings)
        self.source, self.device, self.dtype = self.settings.source(), self.settings.torch_device(), self.settings.dtype()
        self.speed = self.settings.resolve_speed(self.device)
        self.speed_label = self.speed.summary(self.speed_part)

    def ready_line(self) -> str:
        """The model and device; a stage adds its own choices after them."""
        return f"model={self.source.name} device={self.device}"

    def compile_cache(self, **choices: object) -> CompileCache:
        """Where this stage's compiled code is cached: the node's `cache_dir`, shared through the
        `compile_cache` setting, its files keyed by the model, the stage's resolved speed choices and
        `choices` (whatever else shapes its graphs)."""
        resolved = {name: choice.value for name, choice in self.speed.choices(self.speed_keys).items()}
        return CompileCache(self.settings.compile_cache_dir(), {"model": self.source.name, **resolved, **choices},
                            self.settings.compile_cache)

    def stats(self) -> dict[str, Any]:
        """Adds what torch.compile did in this replica (`compile`: FX-graph cache hits and misses,
        dynamo's seconds) and its compile cache's files (`compile_cache`)."""
        return {**super().stats(), "compile": CompileCounts.read().as_dict(), "compile_cache": compile_cache_status()}
