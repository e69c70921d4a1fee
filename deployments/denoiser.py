"""Denoiser deployment: the DiT (bf16 or FP8) on a GPU fraction, scheduled by a configurable policy."""

from __future__ import annotations

import logging
import time

import torch
from ray import serve

from deployments.core import loading
from deployments.core.contracts import DenoiseJob, Latents
from deployments.core.denoising import DenoiseLoop
from deployments.core.scheduling import POLICIES, ContinuousBatcher, run_grouped
from deployments.settings import ModelSettings
from deployments.stage_base import StageBase

logger = logging.getLogger("ray.serve")


@serve.deployment(name="Denoiser")
class Denoiser(StageBase):
    def __init__(self, settings: dict, scheduling: str = "continuous") -> None:
        self._init_stage("Denoiser")
        if scheduling not in POLICIES:
            raise ValueError(f"unknown denoiser scheduling {scheduling!r}; choose one of {', '.join(POLICIES)}")
        self.scheduling = self.default_scheduling = scheduling
        self.settings = ModelSettings(**settings)
        source, device, dtype = self.settings.source(), self.settings.torch_device(), self.settings.dtype()
        start = time.perf_counter()
        transformer = loading.load_transformer(source, device, dtype)
        self.warmup_seconds: dict[str, float] = {}
        if device.type == "cuda":
            transformer = self.gpu_lane.run_blocking(self._optimize, transformer)  # warm the serving thread
        elif self.settings.precision != "bf16" or self.settings.compile:
            logger.warning("precision=%s and compile=%s apply on CUDA only; the CPU runs float32 eager",
                           self.settings.precision, self.settings.compile)
        self.loop = DenoiseLoop(
            transformer, loading.load_scheduler(source), device, dtype, batch_invariant=self.settings.batch_invariant
        )
        self.batcher = ContinuousBatcher(self.loop, self.knobs.max_batch_size, self._record_step, self.gpu_lane)
        self.grouped = self.add_batcher("request", lambda jobs: run_grouped(self.loop, jobs, self._record_step))
        self.load_seconds = time.perf_counter() - start
        logger.info(
            "Denoiser ready in %.1fs: model=%s device=%s precision=%s scheduling=%s batch_invariant=%s",
            self.load_seconds, source.name, device, self.settings.precision, scheduling, self.loop.batch_invariant,
        )

    def _optimize(self, transformer):
        """Real-valued RoPE and fused projections always; FP8 and regional compile as configured.
        With compile on, the configured sizes are compiled (or loaded from the cache) before the
        replica reports ready (`dit.warmup.warm_for_serving`)."""
        from deployments.core.dit.optimize import optimize_transformer
        from deployments.core.dit.warmup import warm_for_serving

        transformer = optimize_transformer(
            transformer, self.settings.precision, self.settings.compile, self.settings.compile_cache_dir(),
            attention=self.settings.attention,
        )
        torch.cuda.empty_cache()  # hand back the blocks of the bf16 weights that FP8 replaced
        if self.settings.compile and self.settings.warmup_sizes:
            sizes = self.settings.warmup_pixels()
            self.warmup_seconds = warm_for_serving(
                transformer, sizes, self.knobs.max_batch_size, self.settings.max_prompt_tokens
            )
        return transformer

    def _record_step(self, size: int, seconds: float) -> None:
        self.stats_by_method["step"].record(size, seconds)

    def reconfigure(self, user_config: dict) -> None:
        self.apply_knobs(user_config)
        self.batcher.max_batch_size = self.knobs.max_batch_size

    def apply_extra_config(self, config: dict) -> None:
        """`scheduling` switches policy live; requests already running finish under the old one."""
        scheduling = config.pop("scheduling", self.default_scheduling)
        super().apply_extra_config(config)
        if scheduling not in POLICIES:
            raise ValueError(f"unknown denoiser scheduling {scheduling!r}; choose one of {', '.join(POLICIES)}")
        self.scheduling = scheduling

    async def denoise(self, job: DenoiseJob) -> Latents:
        if self.scheduling == "continuous":
            return await self.batcher.submit(job)
        if self.scheduling == "batch":
            return await self.grouped.submit(job)
        results = await self.run_model("request", 1, run_grouped, self.loop, [job], self._record_step)
        if isinstance(results[0], Exception):
            raise results[0]
        return results[0]

    def stats(self) -> dict:
        data = super().stats()
        data.update(scheduling=self.scheduling, cancelled=self.batcher.cancelled, load_seconds=self.load_seconds,
                    warmup_seconds=self.warmup_seconds, batch_invariant=self.loop.batch_invariant)
        return data
