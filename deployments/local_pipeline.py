"""The four stages composed in one process, without Ray: for the command line, tests and benchmarks.

It runs exactly the code the deployments wrap, in the same order as the served request path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from deployments.weights import loading
from deployments.contracts import DecodedImage, DenoiseJob, DenoiseRequest, LoraRef
from deployments.denoiser.inpaint import default_strength, latent_mask
from deployments.denoiser.loop import DenoiseLoop
from deployments.weights.model_source import ModelSource
from deployments.style.presets import StyleTable
from deployments.text_encoder.encoding import PromptEncoder
from deployments.vae.codec import VaeCodec


@dataclass(frozen=True)
class GenerationSpec:
    prompt: str
    width: int = 1024
    height: int = 1024
    steps: int = 8
    seed: int = 0
    style: str | None = None
    guidance_scale: float = 0.0
    negative_prompt: str = ""
    init_image: Image.Image | None = None  # already fitted to width x height
    strength: float | None = None  # None: 0.6, or 1.0 with a mask (deployments.denoiser.inpaint)
    mask: Image.Image | None = None  # inpainting: a greyscale mask (white = edit) at width x height
    loras: tuple = ()  # (lora.adapter.LaidOutAdapter, scale) pairs, laid out for this pipeline's DiT

    def request(self) -> DenoiseRequest:
        """What the Ingress would ask the Denoiser for this image."""
        return DenoiseRequest(
            width=self.width, height=self.height, steps=self.steps, seed=self.seed, guidance_scale=self.guidance_scale,
            strength=default_strength(self.strength, self.mask is not None),
            mask=latent_mask(self.mask) if self.mask is not None else None,
            loras=tuple(LoraRef(adapter.name, scale) for adapter, scale in self.loras),
        )


class LocalPipeline:
    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype):
        self.styler = StyleTable()
        self.encoder = PromptEncoder(
            loading.load_tokenizer(source), loading.load_text_encoder(source, device, dtype), device
        )
        self.loop = DenoiseLoop(
            loading.load_transformer(source, device, dtype), loading.load_scheduler(source), device, dtype
        )
        self.codec = VaeCodec(loading.load_vae(source, device, dtype), device, dtype)

    def generate(self, specs: list[GenerationSpec]) -> list[DecodedImage]:
        styled = [self.styler.apply(s.prompt, s.style) for s in specs]
        captions = self.encoder.encode([p.text for p in styled])
        guided = [s for s in specs if s.guidance_scale > 0]
        negatives = iter(self.encoder.encode([s.negative_prompt for s in guided]))
        init_images = [s.init_image for s in specs if s.init_image is not None]
        posteriors = iter(self.codec.encode(init_images))
        jobs = [
            DenoiseJob.from_request(
                spec.request(),
                caption,
                negative=next(negatives) if spec.guidance_scale > 0 else None,
                posterior=next(posteriors) if spec.init_image is not None else None,
                adapters=spec.loras,
            )
            for spec, caption in zip(specs, captions)
        ]
        return self.codec.decode(self.loop.run(jobs))
