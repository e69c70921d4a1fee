"""TextEncoder deployment: batches prompts through the Qwen3 encoder on a GPU fraction."""

from __future__ import annotations

import time
from dataclasses import replace

from pydantic import Field

from deployments.contracts import CaptionEmbedding, ImageTrace, StageTime
from deployments.runtime.model_stage import ModelStage, model_stage_deployment
from deployments.runtime.stage import StageConfig


class TextEncoderConfig(StageConfig):
    """About 6 ms per prompt on an H200 (6.14 and 5.95 ms at 256 tokens, batch 1: RESULTS.md, stages of
    2026-11-22): one replica keeps several Denoisers fed."""

    max_batch_size: int = Field(16, ge=1, le=256)


# num_gpus: a share of one H200 (8.9 GB peak while serving: RESULTS.md, serving of 2026-11-22).
@model_stage_deployment("TextEncoder", num_gpus=0.15, max_ongoing_requests=64)
class TextEncoder(ModelStage):
    config_model = TextEncoderConfig
    speed_part = "text_encoder"
    model_modules = (*ModelStage.model_modules, "transformers:Qwen3Model", "transformers:AutoTokenizer",
                     "deployments.text_encoder.encoding")  # its compile module: in `optimize`, when it compiles

    def load(self) -> None:
        from deployments.weights import loading  # the model code: imported by the replica, not the builder

        self.model = loading.load_text_encoder(self.source, self.device, self.dtype)
        self.tokenizer = loading.load_tokenizer(self.source)

    def optimize(self) -> None:
        from deployments.text_encoder.encoding import PromptEncoder

        self.artifacts = None  # the compile cache, with text_encoder_compile
        if self.speed.text_encoder_compile.value:
            from deployments.runtime.compile_cache import configure_compile_cache, load_compile_artifacts
            from deployments.text_encoder.compile import optimize_text_encoder

            self.artifacts = self.compile_cache()
            configure_compile_cache(self.artifacts)
            load_compile_artifacts(self.artifacts, "text_encoder")
            self.model = optimize_text_encoder(self.model, compile=True)
        self.graphs = 0  # CUDA graphs captured by `warm_up`
        self.encoder = PromptEncoder(
            self.tokenizer,
            self.model,
            self.device,
            max_tokens=self.settings.max_prompt_tokens,
            cuda_graphs=self.settings.text_encoder_cuda_graphs,
            batch_invariant=self.settings.batch_invariant,
        )
        self.encoding = self.add_batcher("encode", self.encoder.encode)

    def warm_up(self) -> None:
        """Compiles (or loads from the cache) and captures every prompt length's graphs, then writes
        the compile cache's file where it lacked what was compiled."""
        self.graphs = self.encoder.warmup()
        if self.artifacts is not None:
            from deployments.runtime.compile_cache import save_compile_artifacts

            save_compile_artifacts(self.artifacts, "text_encoder")

    def ready_line(self) -> str:
        graphs = f" cuda_graphs={self.graphs}" if self.device.type == "cuda" else ""  # what the device uses
        return f"{super().ready_line()} dtype={self.dtype}{graphs} batch_invariant={self.encoder.batch_invariant}"

    async def encode(self, prompt: str) -> CaptionEmbedding:
        start = time.perf_counter()
        caption, queued_s = await self.encoding.submit_timed(prompt)
        return replace(caption, trace=ImageTrace(encode=StageTime.since(start, queued_s)), speed={self.speed_part: self.speed_label})
