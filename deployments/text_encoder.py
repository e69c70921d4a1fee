"""TextEncoder deployment: batches prompts through the Qwen3 encoder on a GPU fraction."""

from __future__ import annotations

import logging

from ray import serve

from deployments.core import loading
from deployments.core.contracts import CaptionEmbedding
from deployments.core.text_encoding import PromptEncoder
from deployments.settings import ModelSettings
from deployments.stage_base import StageBase

logger = logging.getLogger("ray.serve")


@serve.deployment(name="TextEncoder")
class TextEncoder(StageBase):
    def __init__(self, settings: dict) -> None:
        self._init_stage("TextEncoder")
        self.settings = ModelSettings(**settings)
        source, device, dtype = self.settings.source(), self.settings.torch_device(), self.settings.dtype()
        self.random_weights = source.random_weights
        model = loading.load_text_encoder(source, device, dtype)
        if device.type == "cuda" and self.settings.text_encoder_compile:
            from deployments.core.compile_cache import configure_compile_cache
            from deployments.core.text_encoder_compile import optimize_text_encoder

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
        graphs = self.gpu_lane.run_blocking(self.encoder.warmup)  # captured on the thread that serves
        logger.info("TextEncoder ready: model=%s device=%s dtype=%s cuda_graphs=%d batch_invariant=%s",
                    source.name, device, dtype, graphs, self.encoder.batch_invariant)

    def reconfigure(self, user_config: dict) -> None:
        self.apply_knobs(user_config)

    async def encode(self, prompt: str) -> CaptionEmbedding:
        return await self.encoding.submit(prompt)
