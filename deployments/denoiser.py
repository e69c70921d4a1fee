"""Denoiser deployment: the DiT (bf16 or FP8) on a GPU fraction, scheduled by a configurable policy."""

from __future__ import annotations

import logging
import time

from ray import serve

from deployments.core import loading
from deployments.core.contracts import DenoiseJob, Latents
from deployments.core.denoising import DenoiseLoop
from deployments.core.scheduling import POLICIES, ContinuousBatcher, run_grouped
from deployments.settings import ModelSettings
from deployments.stage_base import StageBase, unwrap

logger = logging.getLogger("ray.serve")


@serve.deployment(name="Denoiser")
class Denoiser(StageBase):
    BATCHED_METHODS = ("_denoise_batch",)

    def __init__(self, settings: dict, scheduling: str = "continuous") -> None:
        self._init_stage("Denoiser")
        if scheduling not in POLICIES:
            raise ValueError(f"unknown denoiser scheduling {scheduling!r}; choose one of {', '.join(POLICIES)}")
        self.scheduling = scheduling
        self.settings = ModelSettings(**settings)
        source, device, dtype = self.settings.source(), self.settings.torch_device(), self.settings.dtype()
        start = time.perf_counter()
        transformer = loading.load_transformer(source, device, dtype)
        if device.type == "cuda":
            from deployments.core.fast_dit import optimize_transformer

            transformer = optimize_transformer(
                transformer, self.settings.precision, self.settings.compile, self.settings.compile_cache_dir()
            )
        self.loop = DenoiseLoop(transformer, loading.load_scheduler(source), device, dtype)
        self.batcher = ContinuousBatcher(self.loop, self.knobs.max_batch_size, self._record_step, self.gpu_lane)
        self.load_seconds = time.perf_counter() - start
        logger.info(
            "Denoiser ready in %.1fs: model=%s device=%s precision=%s scheduling=%s",
            self.load_seconds, source.name, device, self.settings.precision, scheduling,
        )

    def _record_step(self, size: int, seconds: float) -> None:
        self.stats_by_method["step"].record(size, seconds)

    def reconfigure(self, user_config: dict) -> None:
        self.apply_knobs(user_config)
        self.batcher.max_batch_size = self.knobs.max_batch_size

    async def denoise(self, job: DenoiseJob) -> Latents:
        if self.scheduling == "continuous":
            return await self.batcher.submit(job)
        if self.scheduling == "batch":
            return unwrap(await self._denoise_batch(job))
        return unwrap(await self.run_model("request", 1, run_grouped, self.loop, [job], self._record_step))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _denoise_batch(self, jobs: list[DenoiseJob]) -> list[Latents | Exception]:
        return await self.run_model("request", len(jobs), run_grouped, self.loop, jobs, self._record_step)

    def stats(self) -> dict:
        data = super().stats()
        data.update(scheduling=self.scheduling, cancelled=self.batcher.cancelled, load_seconds=self.load_seconds)
        return data
