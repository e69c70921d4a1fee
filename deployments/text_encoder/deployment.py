"""TextEncoder deployment: batches prompts through the Qwen3 encoder on a GPU fraction."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from pydantic import Field
from ray import serve

from deployments.weights import loading
from deployments.contracts import CaptionEmbedding, ImageTrace, StageTime
from deployments.text_encoder.encoding import PromptEncoder
from deployments.settings import ModelSettings
from deployments.runtime.stage import StageBase, StageConfig

logger = logging.getLogger("ray.serve")


class TextEncoderConfig(StageConfig):
    """About 6 ms per prompt batched on an H200: one replica keeps several Denoisers fed."""

    max_batch_size: int = Field(16, ge=1, le=256)


@serve.deployment(
    name="TextEncoder",
    # num_gpus: a share of one H200 (peak memory ~10 GB with the full model); 0 where no GPU is in use.
    ray_actor_options={"num_cpus": 0.25, "num_gpus": 0.15},
    max_ongoing_requests=64,
    max_queued_requests=512,
    graceful_shutdown_timeout_s=30,  # a replica Serve stops finishes its queued prompts first
)
class TextEncoder(StageBase):
    config_model = TextEncoderConfig

    def __init__(self, settings: dict, base_config: dict | None = None) -> None:
        self._init_stage("TextEncoder", base_config)
        self.settings = ModelSettings(**settings)
        source, device, dtype = self.settings.source(), self.settings.torch_device(), self.settings.dtype()
        self.random_weights = source.random_weights
        with self.start_phases.phase("load"):
            model = loading.load_text_encoder(source, device, dtype)
        if device.type == "cuda" and self.settings.text_encoder_compile:
            from deployments.runtime.compile_cache import configure_compile_cache
            from deployments.text_encoder.compile import optimize_text_encoder

            configure_compile_cache(self.settings.compile_cache_dir())
            model = optimize_text_encoder(model, compile=True)
        self.encoder = PromptEncoder(
            loading.load_tokenizer(source),
            model,
            device,
            max_tokens=self.settings.max_prompt_tokens,
            cuda_graphs=self.settings.text_encoder_cuda_graphs,
            batch_invariant=self.settings.batch_invariant,
        )
        self.encoding = self.add_batcher("encode", self.encoder.encode)
        with self.start_phases.phase("warmup"):
            graphs = self.gpu_lane.run_blocking(self.encoder.warmup)  # captured on the thread that serves
        logger.info("TextEncoder ready: model=%s device=%s dtype=%s cuda_graphs=%d batch_invariant=%s",
                    source.name, device, dtype, graphs, self.encoder.batch_invariant)
        self.serving()

    async def encode(self, prompt: str) -> CaptionEmbedding:
        start = time.perf_counter()
        caption, queued_s = await self.encoding.submit_timed(prompt)
        return replace(caption, trace=ImageTrace(encode=StageTime.since(start, queued_s)))
