"""The four stages composed in one process, without Ray: for the command line, tests and benchmarks.

It runs exactly the code the deployments wrap, in the same order as the served request path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from PIL import Image

from deployments.weights import loading
from deployments.contracts import ControlLatents, DecodedImage, DenoiseJob, DenoiseRequest, LoraRef, MaskedUpload
from deployments.denoiser.control import DEFAULT_CONTROL_SCALE, ControlNetRunner
from deployments.inpaint_mask import InpaintMask, default_strength
from deployments.denoiser.loop import DenoiseLoop
from deployments.weights.controlnet_source import ControlNetSource, load_controlnet
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
    strength: float | None = None  # None: 0.6, or 1.0 with a mask (deployments.inpaint_mask)
    mask: Image.Image | None = None  # inpainting: a greyscale mask (white = edit) at width x height
    loras: tuple = ()  # (lora.layout.LaidOutAdapter, scale) pairs, laid out for this pipeline's DiT
    control_image: Image.Image | None = None  # ControlNet: already fitted to width x height
    control_scale: float = DEFAULT_CONTROL_SCALE
    keep_unmasked: bool = True  # with a mask: the upload's own pixels outside it (deployments.inpaint_mask)

    def request(self) -> DenoiseRequest:
        """What the Ingress would ask the Denoiser for this image."""
        return DenoiseRequest(
            width=self.width, height=self.height, steps=self.steps, seed=self.seed, guidance_scale=self.guidance_scale,
            strength=default_strength(self.strength, self.mask is not None),
            mask=self.planned_mask().latents if self.mask is not None else None,
            loras=tuple(LoraRef(adapter.name, scale) for adapter, scale in self.loras),
            control_scale=self.control_scale if self.control_image is not None else None,
        )


    def planned_mask(self) -> InpaintMask:
        return InpaintMask.plan(self.mask, (self.width, self.height))

    def paste_upload(self, decoded: DecodedImage) -> DecodedImage:
        """With a mask and `keep_unmasked`, the upload pasted back outside the mask, as the Ingress does."""
        if self.mask is None or not self.keep_unmasked:
            return decoded
        pixels = self.planned_mask().overlay(self.init_image).apply(decoded.pixels.numpy())
        return replace(decoded, pixels=torch.from_numpy(pixels))


class LocalPipeline:
    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype,
                 controlnet: ControlNetSource | None = None):
        self.styler = StyleTable()
        self.encoder = PromptEncoder(
            loading.load_tokenizer(source), loading.load_text_encoder(source, device, dtype), device
        )
        transformer = loading.load_transformer(source, device, dtype)
        self.control = None if controlnet is None else ControlNetRunner(
            load_controlnet(controlnet, device, dtype), transformer)
        self.loop = DenoiseLoop(transformer, loading.load_scheduler(source), device, dtype, control=self.control)
        self.codec = VaeCodec(loading.load_vae(source, device, dtype), device, dtype)

    def generate(self, specs: list[GenerationSpec]) -> list[DecodedImage]:
        styled = [self.styler.apply(s.prompt, s.style) for s in specs]
        captions = self.encoder.encode([p.text for p in styled])
        guided = [s for s in specs if s.guidance_scale > 0]
        negatives = iter(self.encoder.encode([s.negative_prompt for s in guided]))
        # a controlled edit is inpainted by the ControlNet: its upload enters masked, not as a start point
        init_images = [s.init_image for s in specs if s.init_image is not None and s.control_image is None]
        posteriors = iter(self.codec.encode(init_images))
        jobs = []
        for spec, caption in zip(specs, captions):
            request = spec.request()
            control = None
            if spec.control_image is not None:
                latents = self.control_latents(spec.control_image, spec.init_image, spec.mask)
                control = self.control.context(latents, spec.control_scale, request.mask)
            jobs.append(DenoiseJob.from_request(
                request, caption, negative=next(negatives) if spec.guidance_scale > 0 else None,
                posterior=next(posteriors) if spec.init_image is not None and control is None else None,
                adapters=spec.loras, control=control,
            ))
        return [spec.paste_upload(image) for spec, image in zip(specs, self.codec.decode(self.loop.run(jobs)))]

    def control_latents(self, control_image: Image.Image, init_image: Image.Image | None = None,
                        mask: Image.Image | None = None) -> ControlLatents:
        """What the VAE stage's `encode_control` returns for these images."""
        masked = None if mask is None else MaskedUpload(init_image, mask)
        posteriors = self.codec.encode([item for item in (control_image, masked) if item is not None])
        return ControlLatents(posteriors[0].mode(), posteriors[1].mode() if masked is not None else None)
