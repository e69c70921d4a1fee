"""Denoiser deployment: the DiT (bf16 or FP8) on a GPU fraction, scheduled by a configurable policy.

The model code (torch, the loop, the DiT, adapters, control) is imported by the replica where it
is first used, so that the builder imports this shell without it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial
from itertools import chain
from typing import TYPE_CHECKING

from pydantic import Field
from ray import serve

from deployments.contracts import (
    CaptionEmbedding, ControlLatents, DenoiseJob, DenoiseProgress, DenoiseRequest, LatentPosterior, Latents, StageTime,
)
from deployments.runtime.deadlines import DeadlineExceeded
from deployments.denoiser.policies import POLICIES, SchedulingPolicy
from deployments.denoiser.metrics import DenoiserMetrics
from deployments.runtime.background_warmup import BackgroundWarmup, WarmupStep
from deployments.runtime.model_stage import ModelStage, model_stage_deployment
from deployments.runtime.quiet import say_why_where_fp8_runs
from deployments.runtime.stage import StageConfig

if TYPE_CHECKING:
    import torch

    from deployments.denoiser.control import ControlContext
    from deployments.denoiser.dit.step_graphs import GraphedTransformerFn
    from deployments.denoiser.loop import DenoiseState
    from deployments.denoiser.pending_work import PendingWork

logger = logging.getLogger("ray.serve")


class DenoiserConfig(StageConfig):
    """Live config: batching and the scheduling policy (requests already running finish under the old one)."""

    scheduling: SchedulingPolicy = "continuous"
    lora_cache_bytes: int = Field(8 << 30, ge=0)
    """Bytes of LoRA factors a replica keeps on its device (least recently used go first)."""


# num_gpus: a share of one H200 (FP8 DiT: 12.4 GB allocated, 22.3 GB reserved: RESULTS.md, serving of
# 2026-11-22). Over half, so two Denoisers never share a GPU; 0.6 + TextEncoder 0.15 + VaeDecoder 0.2 <= 1
# (serve_config.yaml explains the arithmetic; tests/deploy/test_placement.py checks it).
# graceful_shutdown_timeout_s: a replica Serve stops finishes its running jobs first.
@model_stage_deployment("Denoiser", num_gpus=0.6, max_ongoing_requests=32, graceful_shutdown_timeout_s=60)
class Denoiser(ModelStage):
    config_model = DenoiserConfig
    speed_part = "denoiser"
    model_modules = (*ModelStage.model_modules, "diffusers:ZImageTransformer2DModel", "deployments.denoiser.loop",
                     "deployments.denoiser.scheduling", "deployments.denoiser.dit.optimize",
                     "deployments.denoiser.lora.cache", "deployments.denoiser.control")

    def __init__(self, settings: dict, base_config: dict | None = None) -> None:
        self._init_model_stage(settings, base_config)
        self.warmup_seconds: dict[str, float] = {}
        self.fp8_kernels: str | None = self.speed.fp8_kernels.value  # GPU, FP8 only
        if self.speed.precision.value == "fp8":
            say_why_where_fp8_runs()  # the torchao warnings silenced here concern FP8 (runtime.quiet)
        self.step_graphs: GraphedTransformerFn | None = None
        self.expired = 0  # jobs dropped because their request's deadline passed
        self.denoiser_metrics = DenoiserMetrics(POLICIES)
        self.denoiser_metrics.set_policy(self.config.scheduling)
        # a second warm-up after ready, beside the batched graphs' (which gate batching): a graph per
        # caption bucket at the warm-up sizes and first forwards at the presets (`dit.size_warmup`)
        self.shape_warmup = BackgroundWarmup(self.gpu_lane, None, self._shapes_ready, name="Denoiser shapes")
        self.start()
        self.shape_warmup.start()
        self.load_seconds = self.start_phases.seconds["ready"]
        self.denoiser_metrics.batched_ready.set(float(self.after_ready.ready.is_set()))

    def load(self) -> None:
        from deployments.weights import loading
        from deployments.weights.controlnet_source import load_controlnet

        self.transformer = loading.load_transformer(self.source, self.device, self.dtype)
        control_source = self.settings.controlnet_source()  # the ControlNet: part of the Denoiser's weights
        self.controlnet = None if control_source is None else load_controlnet(control_source, self.device, self.dtype)

    def optimize(self) -> None:
        """On the GPU, real-valued RoPE and fused projections always; FP8 and regional compile as
        resolved (the compile wraps the blocks and loads its cache; it compiles in `warm_up`); the
        ControlNet's blocks joined to that path; the CUDA graphs' wrapper; then the loop and the
        schedulers around them. The CPU runs float32 eager."""
        import torch

        from deployments.denoiser.control import ControlNetRunner
        from deployments.denoiser.dit.optimize import graphed_transformer_fn, optimize_as_resolved
        from deployments.denoiser.lora.cache import AdapterCache
        from deployments.denoiser.lora.library import LoraLibrary
        from deployments.denoiser.loop import DenoiseLoop
        from deployments.denoiser.scheduling import ContinuousBatcher, run_grouped
        from deployments.weights import loading

        if self.device.type == "cuda":
            self.transformer = optimize_as_resolved(self.transformer, self.speed,
                                                    self.compile_cache(attention=self.settings.attention),
                                                    self.settings.attention)
        # joined after the DiT's optimization: its control blocks take the DiT's block path (`control_blocks`)
        self.control = None if self.controlnet is None else ControlNetRunner(self.controlnet, self.transformer)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand back the blocks of the bf16 weights that FP8 replaced (both models')
        self.step_graphs = graphed_transformer_fn(self.transformer, self.speed, self.device, self.control)
        self.loop = DenoiseLoop(
            self.transformer, loading.load_scheduler(self.source), self.device, self.dtype,
            transformer_fn=self.step_graphs, batch_invariant=self.settings.batch_invariant,
            batched_ready=self.after_ready.ready,
            control=self.control,
        )
        self.lora_library = LoraLibrary(self.settings.lora_settings())
        self.lora_cache = AdapterCache(self.lora_library, self.loop.lora_slots, self.config.lora_cache_bytes)
        self.batcher = ContinuousBatcher(self.loop, self.config.max_batch_size, self._record_step, self.gpu_lane,
                                         self.metrics.observer("step"))
        self.grouped = self.add_batcher("request", lambda jobs: run_grouped(self.loop, jobs, self._record_step))
        self.unbatched_jobs: list[DenoiseJob] = []  # in flight under the `batch` or `single` policy

    def _serving_calls(self):
        """(batch-1 calls, calls of batches over one image) of the serving warm-up; none without compile."""
        from deployments.denoiser.dit.warmup import serving_calls

        if not (self.speed.compile.value and self.settings.warmup_sizes):
            return [], []
        single, batched = serving_calls(
            self.settings.warmup_pixels(), self.config.max_batch_size, self.settings.max_prompt_tokens,
            lora=getattr(self.transformer, "_lora_slots", None) is not None,
        )
        return (single + batched, []) if not self.settings.warm_batches_in_background else (single, batched)

    def warm_up(self) -> None:
        """With compile on, the configured sizes are compiled (or loaded from the cache): at batch 1
        before the replica reports ready, batches over one image before it too or, with
        `warm_batches_in_background`, after it (`warm_up_after_ready`)."""
        from deployments.denoiser.dit.warmup import run_calls

        single, _ = self._serving_calls()
        if single:  # then, with a ControlNet, its controlled calls (`denoiser.control_warmup`)
            single += self._control_calls()[0]
            self.warmup_seconds = run_calls(self.transformer, single, control=self.control)

    def _control_calls(self):
        """The ControlNet's warm-up calls: (before ready, with the batches, with the shapes)."""
        from deployments.denoiser.control_warmup import serving_control_calls
        from deployments.geometry import SIZE_PRESETS

        if self.control is None:
            return [], [], []
        return serving_control_calls(*self._serving_calls(), self.control.takes_mask, SIZE_PRESETS)

    def warm_up_after_ready(self) -> list[WarmupStep]:
        """The graphs of batches over one image; until they are warm each image of a batch runs as its
        own forward (`DenoiseLoop.batched_ready`), so nothing compiles on the request path."""
        from deployments.denoiser.control_warmup import control_steps
        from deployments.denoiser.dit.warmup import persist_artifacts, run_call

        self.shape_warmup.plan(self._shape_steps())
        _, batched = self._serving_calls()
        steps: list[WarmupStep] = [(call.key, partial(run_call, self.transformer, call)) for call in batched]
        steps += control_steps(self.transformer, self.control, self._control_calls()[1])
        return steps + [("save_artifacts", partial(persist_artifacts, self.transformer))] if steps else []

    def _shape_steps(self) -> list[WarmupStep]:
        """`dit.size_warmup`, on a GPU (where plans and graphs are made per shape; none on the CPU), with
        the ControlNet's shape calls (`denoiser.control_warmup`) and its graphs where one is loaded."""
        from deployments.denoiser.dit.size_warmup import after_ready_steps
        from deployments.geometry import SIZE_PRESETS

        if self.device.type != "cuda":
            return []
        warm_sizes = self.settings.warmup_pixels()
        covered = warm_sizes if self._serving_calls()[0] else []  # `warm_up` ran them at every caption bucket
        return after_ready_steps(self.transformer, self.step_graphs, warm_sizes, SIZE_PRESETS, covered,
                                 self.settings.max_prompt_tokens, lora_graphs=self.lora_library.offers_any(),
                                 control=self.control, control_calls=self._control_calls()[2])

    def _shapes_ready(self, warmup: BackgroundWarmup) -> None:
        self.start_phases.add("warmup_shapes", warmup.lane_seconds)
        if self.step_graphs is not None:
            logger.info("Denoiser CUDA graphs: %s", self.step_graphs.summary())

    def serving(self, expected_compiles=None) -> None:
        """Compiles are expected while either warm-up after ready runs a call."""
        super().serving(lambda: self.after_ready.running or self.shape_warmup.running)

    def on_warm_after_ready(self, warmup: BackgroundWarmup) -> None:
        self.denoiser_metrics.batched_ready.set(1.0)

    def ready_line(self) -> str:
        return (f"{super().ready_line()} precision={self.speed.precision.value} "
                f"scheduling={self.config.scheduling} batch_invariant={self.loop.batch_invariant}")

    def _record_step(self, size: int, seconds: float) -> None:
        self.record_batch("step", size, seconds)

    def drainers(self) -> list:
        """The step-level batcher's task too (`StageBase.aclose`)."""
        batcher = getattr(self, "batcher", None)  # absent if the constructor failed before it
        return super().drainers() + ([batcher] if batcher is not None else [])

    def apply_config(self, config: DenoiserConfig) -> None:
        self.batcher.max_batch_size = config.max_batch_size
        self.denoiser_metrics.set_policy(config.scheduling)
        if hasattr(self, "lora_cache"):
            self.lora_cache.capacity_bytes = config.lora_cache_bytes

    @serve.multiplexed(max_num_models_per_replica=16)
    async def adapter_set(self, model_id: str) -> str:
        """Registers a request's adapter set (its multiplexed model ID) as held here, so that Serve routes
        requests with that set to this replica; the adapters themselves live in `lora_cache`."""
        return model_id

    async def _adapters(self, request: DenoiseRequest) -> tuple:
        if request.loras and serve.get_multiplexed_model_id():
            await self.adapter_set(serve.get_multiplexed_model_id())
        return await self.lora_cache.resolve_async(request.loras)

    async def denoise(
        self,
        request: DenoiseRequest,
        caption: CaptionEmbedding,
        negative: CaptionEmbedding | None = None,
        posterior: LatentPosterior | None = None,
        control: ControlLatents | None = None,
    ) -> Latents:
        """One image. The caption, negative caption, upload posterior and control latents arrive as
        separate arguments (the text encoder's and VAE's responses, passed on by the Ingress), so a
        request's images share one copy of each instead of each carrying its own."""
        start = time.perf_counter()
        adapters = await self._adapters(request)
        job = DenoiseJob.from_request(request, caption, negative, posterior, adapters=adapters,
                                      control=self._control(request, control))
        latents, queued_s = await self._run(job)
        return self._finished(latents, queued_s, caption, posterior, start)

    async def denoise_stream(
        self,
        request: DenoiseRequest,
        caption: CaptionEmbedding,
        negative: CaptionEmbedding | None = None,
        posterior: LatentPosterior | None = None,
        previews: int = 0,
        control: ControlLatents | None = None,
    ) -> AsyncIterator[DenoiseProgress]:
        """`denoise` step by step, for `handle.options(stream=True)`: one update after each step, with the
        clean-latent estimate at `previews` evenly spread steps, then the result (the very latents
        `denoise` returns). Closing the stream (the client went away) cancels the job, which the
        scheduler drops at its next step."""
        from deployments.denoiser.loop import clean_estimate, preview_steps

        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[DenoiseProgress | None] = asyncio.Queue()

        def on_step(state: DenoiseState, noise_pred: torch.Tensor) -> None:  # on the model thread
            chosen = state.step_index in preview_steps(state.total_steps, previews)
            preview = Latents(clean_estimate(state, noise_pred), request.width, request.height) if chosen else None
            update = DenoiseProgress(state.step_index, state.total_steps, time.perf_counter() - start, preview)
            loop.call_soon_threadsafe(updates.put_nowait, update)

        adapters = await self._adapters(request)
        job = DenoiseJob.from_request(request, caption, negative, posterior, on_step, adapters=adapters,
                                      control=self._control(request, control))
        task = asyncio.ensure_future(self._run(job))
        task.add_done_callback(lambda _: updates.put_nowait(None))  # after the steps' updates, which came first
        try:
            while (update := await updates.get()) is not None:
                yield update
            latents = self._finished(*await task, caption, posterior, start)
            yield DenoiseProgress(latents.steps_run, latents.steps_run, time.perf_counter() - start, result=latents,
                                  caption_tokens=caption.num_tokens)
        finally:
            task.cancel()

    def control_channels(self) -> int | None:
        """The loaded ControlNet's control channels (16: control only; 33, Union 2.x: also a mask), None
        without one: the Ingress refuses edits with control that this ControlNet cannot inpaint."""
        return None if self.control is None else self.control.in_dim

    def _control(self, request: DenoiseRequest, latents: ControlLatents | None) -> ControlContext | None:
        """The job's control input from the VAE's `ControlLatents` (None for an uncontrolled image)."""
        if request.control_scale is None and latents is None:
            return None
        if self.control is None:
            raise ValueError("this Denoiser has no ControlNet loaded (the `controlnet` setting)")
        if request.control_scale is None or latents is None:
            raise ValueError("a controlled image needs both control_scale and its control latents")
        return self.control.context(latents, request.control_scale, request.mask)

    def _finished(self, latents: Latents, queued_s: float, caption: CaptionEmbedding,
                  posterior: LatentPosterior | None, start: float) -> Latents:
        upstream = caption.trace if posterior is None else caption.trace.joined(posterior.trace)
        trace = replace(upstream, denoise=StageTime.since(start, queued_s))
        return replace(latents, trace=trace, prompt_truncated=caption.truncated,
                       speed={**caption.speed, self.speed_part: self.speed_label})

    async def _run(self, job: DenoiseJob) -> tuple[Latents, float]:
        """(latents, seconds the job waited before its first step), under the live scheduling policy."""
        from deployments.denoiser.scheduling import run_grouped

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
        from deployments.denoiser.pending_work import measure

        return measure(chain(self.batcher.queued_jobs(), self.unbatched_jobs), self.batcher.running_jobs())

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom-metrics hook, read by deployments.autoscaling.QueuedWorkPolicy. Async, so it
        runs on the replica's event loop, where the queues change."""
        return self.pending_work().as_metrics()

    def stats(self) -> dict:
        data = super().stats()
        data.update(scheduling=self.config.scheduling, cancelled=self.batcher.cancelled, expired=self.expired,
                    load_seconds=self.load_seconds, warmup_seconds=self.warmup_seconds,
                    batched_graphs_ready=self.after_ready.ready.is_set(),
                    batched_warmup=self.after_ready.as_dict(),
                    shape_warmup=self.shape_warmup.as_dict(),
                    pending_work=self.pending_work().as_metrics(),
                    batch_invariant=self.loop.batch_invariant,
                    fp8_kernels=self.fp8_kernels, loras=self.lora_cache.stats(),
                    step_graphs=None if self.step_graphs is None else self.step_graphs.as_dict())
        return data
