"""The application's stages as plain objects in one process: the served request path, without Ray or HTTP.

Each stage is its deployment's own class (`Deployment.func_or_class`) built from the model settings
as a replica builds it: `auto` resolves on this device, and each stage loads, optimizes and warms up
(before and after ready) as it does when served. A request goes through the handle API's planning
(`serve_app.planning.plan_handle_request`: decoding, checks, fitting, preprocessing) and the
Ingress's `ImagePipeline`; what is left out is HTTP and Ray's hops between the stages. Benchmarks
that time the request path in one process use it, and reach into a stage (`app.stage("denoiser")`)
for its step.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any

from serve_app.config import ApiLimits
from serve_app.control import ControlNetInfo
from serve_app.pipeline import ImagePipeline
from serve_app.planning import plan_handle_request
from serve_app.protocol import ImageRequest, ImageResult

STAGES = {"styler": "deployments.style.deployment:PromptStyler",
          "text_encoder": "deployments.text_encoder.deployment:TextEncoder",
          "denoiser": "deployments.denoiser.deployment:Denoiser",
          "vae": "deployments.vae.deployment:VaeDecoder"}


class LocalHandle:
    """A deployment handle's `method.remote(...)` shape over an object in this process: a call returns
    a task; a task passed as an argument is awaited first, as Serve resolves a response passed on."""

    def __init__(self, target: Any):
        self.target = target

    def options(self, **_: Any) -> LocalHandle:  # streaming and multiplexing need no routing here
        return self

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self.target, name))


class _LocalMethod:
    def __init__(self, method: Any):
        self.method = method

    def remote(self, *args: Any, **kwargs: Any) -> asyncio.Task:
        async def call() -> Any:
            resolved = [await a if isinstance(a, asyncio.Future) else a for a in args]
            result = self.method(*resolved, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return asyncio.ensure_future(call())


class LocalApp:
    """The four stages, the pipeline over them and an event loop of their own (`request` is blocking).

    The stages start one after another, each waited for until its warm-ups after ready are done, and
    requests run one at a time: in one process the stages share one CUDA context, where a graph that
    one stage's thread captures must not meet another's work (a replica has its own process)."""

    def __init__(self, settings: dict, warm_timeout_s: float = 1200, limits: ApiLimits | None = None):
        import importlib

        from deployments.settings import ModelSettings

        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.targets: dict[str, Any] = {}
        self.start_s: dict[str, dict[str, float]] = {}  # per stage: seconds to ready, then to warm
        for name, path in STAGES.items():
            module, cls = path.split(":")
            deployment = getattr(importlib.import_module(module), cls)
            started = time.perf_counter()
            target = deployment.func_or_class() if name == "styler" else deployment.func_or_class(settings)
            ready_s = time.perf_counter() - started
            self.targets[name] = target
            self.start_s[name] = {"ready_s": ready_s, "warm_after_ready_s": wait_warm(target, warm_timeout_s)}
        handles = {name: LocalHandle(target) for name, target in self.targets.items()}
        source = ModelSettings(**settings).source()
        self.model_name, self.limits = source.name, limits or ApiLimits()
        self.pipeline = ImagePipeline(**handles, random_weights=source.random_weights)
        self.controlnet = ControlNetInfo(settings.get("controlnet"), handles["denoiser"])

    def stage(self, name: str) -> Any:
        return self.targets[name]

    def request(self, request: ImageRequest) -> tuple[ImageResult, float]:
        """The result and seconds of one request, from its bytes to its encoded images."""

        async def run() -> ImageResult:
            plan = await plan_handle_request(request, self.limits, self.model_name, self.controlnet)
            return await self.pipeline.run(plan)

        started = time.perf_counter()
        result = self.loop.run_until_complete(run())
        return result, time.perf_counter() - started

    def close(self) -> None:
        self.loop.close()


def wait_warm(target: Any, timeout_s: float) -> float:
    """Seconds until a stage's warm-ups after ready (batched graphs, shapes, the VAE's dynamic graph) are done."""
    started = time.perf_counter()
    for warmup in (getattr(target, name, None) for name in ("after_ready", "shape_warmup")):
        if warmup is not None and not warmup.wait(max(timeout_s - (time.perf_counter() - started), 0.0)):
            raise TimeoutError(f"{type(target).__name__}'s warm-up after ready took over {timeout_s} s")
    return time.perf_counter() - started
