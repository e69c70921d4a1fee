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
    """The four stages, the pipeline over them and an event loop of their own (`request` is blocking)."""

    def __init__(self, settings: dict, limits: ApiLimits | None = None):
        import importlib

        from deployments.settings import ModelSettings

        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        started = time.perf_counter()
        self.targets: dict[str, Any] = {}
        for name, path in STAGES.items():
            module, cls = path.split(":")
            deployment = getattr(importlib.import_module(module), cls)
            self.targets[name] = deployment.func_or_class() if name == "styler" else deployment.func_or_class(settings)
        self.ready_s = time.perf_counter() - started  # every stage built and warmed up before ready
        handles = {name: LocalHandle(target) for name, target in self.targets.items()}
        source = ModelSettings(**settings).source()
        self.model_name, self.limits = source.name, limits or ApiLimits()
        self.pipeline = ImagePipeline(**handles, random_weights=source.random_weights)
        self.controlnet = ControlNetInfo(settings.get("controlnet"), handles["denoiser"])

    def stage(self, name: str) -> Any:
        return self.targets[name]

    def wait_warm(self, timeout_s: float) -> float:
        """Seconds until every warm-up after ready (batched graphs, shapes, the VAE's dynamic graph) is done."""
        started = time.perf_counter()
        for target in self.targets.values():
            for warmup in (getattr(target, name, None) for name in ("after_ready", "shape_warmup")):
                left = timeout_s - (time.perf_counter() - started)
                if warmup is not None and not warmup.wait(max(left, 0.0)):
                    raise TimeoutError(f"{type(target).__name__}'s warm-up after ready took over {timeout_s} s")
        return time.perf_counter() - started

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
