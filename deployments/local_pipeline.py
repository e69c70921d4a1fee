"""The four stages composed in one process, without Ray: for the command line, tests and benchmarks.

It runs exactly the code the deployments wrap, in the same order as the served request path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from deployments.weights import loading
from deployments.contracts import DecodedImage, DenoiseJob
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
        jobs = []
        for spec, caption in zip(specs, captions):
            jobs.append(
                DenoiseJob(
                    caption=caption.embedding,
                    width=spec.width,
                    height=spec.height,
                    steps=spec.steps,
                    seed=spec.seed,
                    guidance_scale=spec.guidance_scale,
                    negative_caption=next(negatives).embedding if spec.guidance_scale > 0 else None,
                    init_posterior=next(posteriors) if spec.init_image is not None else None,
                    strength=(default_strength(spec.strength, spec.mask is not None)
                              if spec.init_image is not None else 1.0),
                    mask=latent_mask(spec.mask) if spec.mask is not None else None,
                    loras=spec.loras,
                )
            )
        return self.codec.decode(self.loop.run(jobs))
