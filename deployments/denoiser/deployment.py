"""Denoiser deployment: the DiT (bf16 or FP8) on a GPU fraction, scheduled by a configurable policy."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from itertools import chain

import torch
from ray import serve

from deployments.weights import loading
from deployments.denoiser.batched_warmup import BatchedWarmup, WarmupStep
from deployments.contracts import (
    CaptionEmbedding,
    DenoiseJob,
    DenoiseProgress,
    DenoiseRequest,
    LatentPosterior,
    Latents,
)
from deployments.runtime.deadlines import DeadlineExceeded
from deployments.denoiser.loop import (
    DenoiseLoop,
    DenoiseState,
    clean_estimate,
    diffusers_transformer_fn,
    preview_steps,
)
from deployments.denoiser.dit.caption_buckets import padded_transformer_fn
from deployments.denoiser.dit.step_graphs import GraphedTransformerFn
from deployments.denoiser.pending_work import PendingWork, measure
from deployments.denoiser.scheduling import POLICIES, ContinuousBatcher, SchedulingPolicy, run_grouped
from deployments.denoiser.metrics import DenoiserMetrics
from deployments.settings import ModelSettings
from deployments.runtime.stage import StageBase, StageConfig

logger = logging.getLogger("ray.serve")


class DenoiserConfig(StageConfig):
    """Live config: batching and the scheduling policy (requests already running finish under the old one)."""

    scheduling: SchedulingPolicy = "continuous"


@serve.deployment(
    name="Denoiser",
    # num_gpus: a share of one H200 (FP8 DiT: 12.4 GB allocated, 22 GB reserved); 0 where no GPU is in use.
    # Over half, so two Denoisers never share a GPU; 0.6 + TextEncoder 0.15 + VaeDecoder 0.2 <= 1
    # (serve_config.yaml explains the arithmetic; tests/deploy/test_placement.py checks it).
    ray_actor_options={"num_cpus": 0.25, "num_gpus": 0.6},
    max_ongoing_requests=32,
    max_queued_requests=256,
    graceful_shutdown_timeout_s=60,  # a replica Serve stops finishes its running jobs first
)
class Denoiser(StageBase):
    config_model = DenoiserConfig

    def __init__(self, settings: dict, base_config: dict | None = None) -> None:
        self._init_stage("Denoiser", base_config)
        self.settings = ModelSettings(**settings)
        source, device, dtype = self.settings.source(), self.settings.torch_device(), self.settings.dtype()
        start = time.perf_counter()
        with self.start_phases.phase("load"):
            transformer = loading.load_transformer(source, device, dtype)
        self.warmup_seconds: dict[str, float] = {}
        self.fp8_kernels: str | None = None  # resolved in `_optimize` (GPU, FP8 only)
        self._after_ready: list[WarmupStep] = []  # warm-up calls left for after ready (set by _optimize)
        if device.type == "cuda":
            transformer = self.gpu_lane.run_blocking(self._optimize, transformer)  # warm the serving thread
        elif self.settings.precision != "bf16" or self.settings.compile:
            logger.warning("precision=%s and compile=%s apply on CUDA only; the CPU runs float32 eager",
                           self.settings.precision, self.settings.compile)
        self.batched_warmup = BatchedWarmup(self.gpu_lane, self._after_ready, on_ready=self._batched_graphs_ready)
        self.step_graphs: GraphedTransformerFn | None = None
        if self.settings.dit_cuda_graphs and device.type == "cuda":
            self.step_graphs = GraphedTransformerFn.on(diffusers_transformer_fn(transformer), device,
                                                       padded=padded_transformer_fn(transformer))
        elif self.settings.dit_cuda_graphs:
            logger.warning("dit_cuda_graphs applies on CUDA only; the DiT runs without graphs on %s", device)
        # after ready: a graph per caption bucket at the warm-up sizes, a first forward at the presets
        self.shape_warmup = BatchedWarmup(self.gpu_lane, self._shape_warmup_steps(transformer, device),
                                          on_ready=lambda w: self.start_phases.add("warmup_shapes", w.lane_seconds))
        self.loop = DenoiseLoop(
            transformer, loading.load_scheduler(source), device, dtype, transformer_fn=self.step_graphs,
            batch_invariant=self.settings.batch_invariant, batched_ready=self.batched_warmup.ready,
        )
        self.denoiser_metrics = DenoiserMetrics(POLICIES)
        self.denoiser_metrics.set_policy(self.config.scheduling)
        self.denoiser_metrics.batched_ready.set(float(self.batched_warmup.ready.is_set()))
        self.batcher = ContinuousBatcher(self.loop, self.config.max_batch_size, self._record_step, self.gpu_lane,
                                         self.metrics.observer("step"))
        self.grouped = self.add_batcher("request", lambda jobs: run_grouped(self.loop, jobs, self._record_step))
        self.unbatched_jobs: list[DenoiseJob] = []  # in flight under the `batch` or `single` policy
        self.load_seconds = time.perf_counter() - start
        self.expired = 0  # jobs dropped because their request's deadline passed
        logger.info(
            "Denoiser ready in %.1fs: model=%s device=%s precision=%s scheduling=%s batch_invariant=%s",
            self.load_seconds, source.name, device, self.settings.precision, self.config.scheduling,
            self.loop.batch_invariant,
        )
        self.serving(expected_compiles=lambda: self.batched_warmup.running or self.shape_warmup.running)
        self.batched_warmup.start()  # nothing to do when every graph was warmed above
        self.shape_warmup.start()

    def _batched_graphs_ready(self, warmup: BatchedWarmup) -> None:
        self.start_phases.add("warmup_batched", warmup.lane_seconds)
        self.denoiser_metrics.batched_ready.set(1.0)

    def _shape_warmup_steps(self, transformer, device: torch.device) -> list[WarmupStep]:
        """`dit.size_warmup`: on a GPU, where plans and graphs are made per shape (none on the CPU)."""
        from deployments.denoiser.dit.size_warmup import after_ready_steps
        from deployments.geometry import SIZE_PRESETS

        if device.type != "cuda":
            return []
        warm_sizes = self.settings.warmup_pixels()
        covered = warm_sizes if self.settings.compile else []  # `_optimize` ran them at every bucket
        return after_ready_steps(transformer, self.step_graphs, warm_sizes, SIZE_PRESETS, covered,
                                 self.settings.max_prompt_tokens)

    def _optimize(self, transformer):
        """Real-valued RoPE and fused projections always; FP8 and regional compile as configured.
        With compile on, the configured sizes are compiled (or loaded from the cache): at batch 1
        before the replica reports ready, batches over one image before it too or, with
        `warm_batches_in_background`, afterwards (`dit.warmup.serving_calls`)."""
        from functools import partial

        from deployments.denoiser.dit.optimize import optimize_transformer
        from deployments.denoiser.dit.warmup import persist_artifacts, run_call, run_calls, serving_calls

        with self.start_phases.phase("quantize"):  # RoPE, fusion, FP8; compile wraps the blocks (and loads its cache)
            if self.settings.precision == "fp8":
                self.fp8_kernels = self.settings.dit_fp8_kernels(self.settings.torch_device())
                logger.info("FP8 DiT kernels: %s (setting %r)", self.fp8_kernels, self.settings.fp8_kernels)
            transformer = optimize_transformer(
                transformer, self.settings.precision, self.settings.compile, self.settings.compile_cache_dir(),
                attention=self.settings.attention, fp8_kernels=self.fp8_kernels or "inductor",
            )
            torch.cuda.empty_cache()  # hand back the blocks of the bf16 weights that FP8 replaced
        if self.settings.compile and self.settings.warmup_sizes:
            single, batched = serving_calls(
                self.settings.warmup_pixels(), self.config.max_batch_size, self.settings.max_prompt_tokens
            )
            if not self.settings.warm_batches_in_background:
                single, batched = single + batched, []
            with self.start_phases.phase("warmup"):
                self.warmup_seconds = run_calls(transformer, single)
            if batched:
                self._after_ready += [(call.key, partial(run_call, transformer, call)) for call in batched]
                self._after_ready.append(("save_artifacts", partial(persist_artifacts, transformer)))
        return transformer

    def _record_step(self, size: int, seconds: float) -> None:
        self.record_batch("step", size, seconds)

    def apply_config(self, config: DenoiserConfig) -> None:
        self.batcher.max_batch_size = config.max_batch_size
        self.denoiser_metrics.set_policy(config.scheduling)

    async def denoise(
        self,
        request: DenoiseRequest,
        caption: CaptionEmbedding,
        negative: CaptionEmbedding | None = None,
        posterior: LatentPosterior | None = None,
    ) -> Latents:
        """One image. The caption, negative caption and upload posterior arrive as separate arguments
        (the text encoder's and VAE's responses, passed on by the Ingress), so a request's images
        share one copy of each instead of each carrying its own."""
        start = time.perf_counter()
        latents, queued_s = await self._run(self._job(request, caption, negative, posterior))
        return self._finished(latents, queued_s, caption, posterior, start)

    async def denoise_stream(
        self,
        request: DenoiseRequest,
        caption: CaptionEmbedding,
        negative: CaptionEmbedding | None = None,
        posterior: LatentPosterior | None = None,
        previews: int = 0,
    ) -> AsyncIterator[DenoiseProgress]:
        """`denoise` step by step, for `handle.options(stream=True)`: one update after each step, with the
        clean-latent estimate at `previews` evenly spread steps, then the result (the very latents
        `denoise` returns). Closing the stream (the client went away) cancels the job, which the
        scheduler drops at its next step."""
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[DenoiseProgress | None] = asyncio.Queue()

        def on_step(state: DenoiseState, noise_pred: torch.Tensor) -> None:  # on the model thread
            chosen = state.step_index in preview_steps(state.total_steps, previews)
            preview = Latents(clean_estimate(state, noise_pred), request.width, request.height) if chosen else None
            update = DenoiseProgress(state.step_index, state.total_steps, time.perf_counter() - start, preview)
            loop.call_soon_threadsafe(updates.put_nowait, update)

        task = asyncio.ensure_future(self._run(self._job(request, caption, negative, posterior, on_step)))
        task.add_done_callback(lambda _: updates.put_nowait(None))  # after the steps' updates, which came first
        try:
            while (update := await updates.get()) is not None:
                yield update
            latents = self._finished(*await task, caption, posterior, start)
            yield DenoiseProgress(latents.steps_run, latents.steps_run, time.perf_counter() - start, result=latents,
                                  caption_tokens=caption.num_tokens)
        finally:
            task.cancel()

    @staticmethod
    def _job(request: DenoiseRequest, caption: CaptionEmbedding, negative: CaptionEmbedding | None,
             posterior: LatentPosterior | None, on_step=None) -> DenoiseJob:
        return DenoiseJob(
            caption=caption.embedding, width=request.width, height=request.height, steps=request.steps,
            seed=request.seed, guidance_scale=request.guidance_scale,
            negative_caption=negative.embedding if negative is not None else None,
            init_posterior=posterior, strength=request.strength if posterior is not None else 1.0,
            mask=request.mask, deadline=request.deadline, on_step=on_step,
        )

    @staticmethod
    def _finished(latents: Latents, queued_s: float, caption: CaptionEmbedding, posterior: LatentPosterior | None,
                  start: float) -> Latents:
        upstream = {**caption.timings, **(posterior.timings if posterior is not None else {})}
        timings = {**upstream, "denoise_ms": round((time.perf_counter() - start) * 1000, 2),
                   "denoise_queue_ms": round(queued_s * 1000, 2)}
        return Latents(latents=latents.latents, width=latents.width, height=latents.height,
                       steps_run=latents.steps_run, timings=timings, prompt_truncated=caption.truncated)

    async def _run(self, job: DenoiseJob) -> tuple[Latents, float]:
        """(latents, seconds the job waited before its first step), under the live scheduling policy."""
        try:
            if self.config.scheduling == "continuous":
                return await self.batcher.submit_timed(job)
            self.unbatched_jobs.append(job)
            try:
                if self.config.scheduling == "batch":
                    return await self.grouped.submit_timed(job)
                results, queued_s = await self.run_model_timed("request", 1, run_grouped, self.loop, [job],
                                                               self._record_step)
                if isinstance(results[0], Exception):
                    raise results[0]
                return results[0], queued_s
            finally:
                self.unbatched_jobs.remove(job)
        except DeadlineExceeded:
            self.expired += 1
            self.denoiser_metrics.expired.inc()
            raise

    def pending_work(self) -> PendingWork:
        """The images waiting for this replica's GPU and the steps they have left (jobs under the
        `batch` and `single` policies count as queued: their progress is not tracked)."""
        return measure(chain(self.batcher.queued_jobs(), self.unbatched_jobs), self.batcher.running_jobs())

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom-metrics hook, read by deployments.autoscaling.QueuedWorkPolicy. Async, so it
        runs on the replica's event loop, where the queues change."""
        return self.pending_work().as_metrics()

    def stats(self) -> dict:
        data = super().stats()
        data.update(scheduling=self.config.scheduling, cancelled=self.batcher.cancelled, expired=self.expired,
                    load_seconds=self.load_seconds, warmup_seconds=self.warmup_seconds,
                    batched_graphs_ready=self.batched_warmup.ready.is_set(),
                    batched_warmup=self.batched_warmup.as_dict(),
                    shape_warmup=self.shape_warmup.as_dict(),
                    pending_work=self.pending_work().as_metrics(),
                    batch_invariant=self.loop.batch_invariant,
                    fp8_kernels=self.fp8_kernels,
                    step_graphs=None if self.step_graphs is None else self.step_graphs.as_dict())
        return data
