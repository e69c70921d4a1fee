"""The request path as plain asyncio: plan a request, then drive it through the four stages.

    style -> encode prompt (and negative) -> [encode upload] -> denoise each image -> decode
          -> [paste the upload back outside an inpainting mask] -> encode output

`ImagePipeline.run` returns the finished images; `ImagePipeline.stream` runs the same path for one
image and yields progress on the way (each step, and previews decoded from the Denoiser's estimate).

`ImagePipeline` takes the stages' deployment handles (in production Ray Serve `DeploymentHandle`s;
in tests, in-process stand-ins with the same `handle.method.remote(...)` shape), so it is tested
without HTTP or Serve. Stage outputs go straight to the next stage: the caption embedding, the
negative one and the upload's posterior are handed to every Denoiser call as the text encoder's and
VAE's responses, and each Denoiser response to the VaeDecoder, so tensors never pass through here
and a request's images share one copy of what they have in common.

A replica that dies mid-request (serve_app.retry) surfaces at whichever await follows it, so an
image's whole chain is retried: it is seeded, so the retry gives the same pixels. The request's
deadline travels to the Denoiser, and a request that fails or is cancelled cancels its stage calls.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from PIL import Image

from deployments.contracts import (
    DecodedImage, DenoiseRequest, ImageTrace, Latents, LoraRef, StageTime, StyledPrompt, TenantTag,
)
from deployments.geometry import fit_upload, fitted_size, parse_size, size_problem, size_rule
from serve_app.config import ApiLimits
from serve_app.control import ControlPlan, plan_control
from serve_app.errors import ApiError, bad_request
from serve_app.image_io import encode_output
from serve_app.masks import plan_mask
from serve_app.protocol import GeneratedImage, ImageOptions, ImageResult, LoraSpec, PartialImage, StepDone, Timings
from serve_app.replica_imports import import_request_path
from serve_app.retry import RetryPolicy

if TYPE_CHECKING:
    import torch

    from deployments.inpaint_mask import UploadOverlay

DEFAULT_SIZE = (1024, 1024)


@dataclass(frozen=True)
class RequestPlan:
    """A validated request, ready to run."""

    prompt: str
    n: int
    width: int
    height: int
    steps: int
    seed: int
    style: str | None
    guidance_scale: float
    negative_prompt: str
    output_format: str
    output_compression: int | None
    init_image: Image.Image | None = None
    strength: float = 1.0
    mask: torch.Tensor | None = None  # inpainting: the Denoiser's latent-grid mask (serve_app.masks)
    overlay: UploadOverlay | None = None  # inpainting with keep_unmasked: the upload pasted back outside the mask
    loras: tuple[LoraSpec, ...] = ()  # names checked against the adapters offered (serve_app.loras)
    control: ControlPlan | None = None  # the ControlNet's inputs (serve_app.control)
    tenant: TenantTag = TenantTag()  # whose images: the Denoiser's queue orders tenants by fair share

    def denoise_request(self, index: int, deadline: float | None) -> DenoiseRequest:
        """What the Denoiser is asked for image `index` (seed + index) of this request."""
        return DenoiseRequest(width=self.width, height=self.height, steps=self.steps, seed=self.seed + index,
                              guidance_scale=self.guidance_scale, strength=self.strength, mask=self.mask,
                              control_scale=None if self.control is None else self.control.scale, deadline=deadline,
                              loras=tuple(LoraRef(lora.name, lora.scale) for lora in self.loras), tenant=self.tenant)


def plan_request(req: ImageOptions, init: Image.Image | None, limits: ApiLimits, model_name: str,
                 mask: Image.Image | None = None, control: Image.Image | None = None) -> RequestPlan:
    """Applies the server's limits and defaults to a parsed request; a problem is a 4xx `ApiError`.
    `mask` (serve_app.masks.decode_mask) belongs to `init` and is fitted with it; `control` is the
    decoded control image (serve_app.control), fitted to the generation size."""
    from deployments.inpaint_mask import default_strength  # torch: imported by the replica (replica_imports)

    if req.model is not None and req.model not in (limits.served_model_name, model_name):
        raise ApiError(404, f"The model '{req.model}' does not exist; this server serves "
                            f"'{limits.served_model_name}'.", param="model", code="model_not_found")
    n = req.n or 1
    if n > limits.max_images_per_request:
        raise bad_request(f"n must be at most {limits.max_images_per_request}.", param="n")
    if req.stream and n > 1:
        raise bad_request("A streamed request makes one image: send n=1, one request per image (image i of a "
                          "request with seed s is the image of seed s + i).", param="n", code="unsupported_value")
    steps = req.num_inference_steps or limits.default_steps
    if not limits.min_steps <= steps <= limits.max_steps:
        raise bad_request(f"num_inference_steps must be within {limits.min_steps}..{limits.max_steps}.",
                          param="num_inference_steps")
    if req.size in (None, "auto"):
        sized_by = init if init is not None else control
        width, height = fitted_size(*sized_by.size) if sized_by is not None else DEFAULT_SIZE
    else:
        width, height = parse_size(req.size)
    problem = size_problem(width, height, limits.max_pixels)
    if problem:
        raise bad_request(f"Invalid size '{width}x{height}': {problem}. {size_rule(limits.max_pixels)}.", param="size")
    loras = tuple(req.loras or ())
    if len(loras) > limits.max_loras_per_request:
        raise bad_request(f"At most {limits.max_loras_per_request} LoRA adapters per request.", param="loras")
    if len({lora.name for lora in loras}) < len(loras):
        raise bad_request("Each LoRA adapter may appear once per request.", param="loras")
    seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
    if mask is not None and init is None:
        raise bad_request("A mask needs an image to edit.", param="mask", code="invalid_mask")
    fitted_init = fit_upload(init, (width, height)) if init is not None else None
    inpaint = plan_mask(mask, width, height) if mask is not None else None
    control_plan = None
    if control is not None:
        control_plan = plan_control(control, req.control_scale, req.control_preprocess, (width, height), fitted_init,
                                    None if inpaint is None else inpaint.fitted, getattr(req, "strength", None))
    return RequestPlan(
        prompt=req.prompt, n=n, width=width, height=height, steps=steps, seed=seed, style=req.style,
        guidance_scale=req.guidance_scale, negative_prompt=req.negative_prompt or "",
        output_format=req.output_format or "png", output_compression=req.output_compression,
        init_image=fitted_init,
        strength=default_strength(getattr(req, "strength", None), mask is not None) if init is not None else 1.0,
        mask=None if inpaint is None else inpaint.latents,
        overlay=inpaint.overlay(fitted_init) if inpaint is not None and getattr(req, "keep_unmasked", True) else None,
        loras=loras,
        control=control_plan,
    )


def encode_image(pixels: torch.Tensor, plan: RequestPlan, overlay: UploadOverlay | None) -> bytes:
    """Decoded pixels as the request's output file; with an inpainting overlay, the upload pasted back
    outside the mask first (deployments.inpaint_mask says why here)."""
    if overlay is not None:
        import torch

        pixels = torch.from_numpy(overlay.apply(pixels.numpy()))
    return encode_output(pixels, plan.output_format, plan.output_compression)


@dataclass(frozen=True)
class Conditioning:
    """What every image of a request shares: the styled prompt, and the stages' responses (not yet
    awaited) for the caption, the negative caption, the upload's posterior and the control latents."""

    styled: StyledPrompt
    caption: Any
    negative: Any
    posterior: Any
    style_ms: float
    control: Any = None


class ImagePipeline:
    def __init__(self, styler: Any, text_encoder: Any, denoiser: Any, vae: Any, random_weights: bool = False,
                 retry: RetryPolicy | None = None):
        import_request_path()  # here, before the Ingress is ready: its requests import nothing
        self.styler = styler
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.vae = vae
        self.random_weights = random_weights
        self.retry = retry or RetryPolicy()

    async def run(self, plan: RequestPlan, deadline: float | None = None) -> ImageResult:
        """`deadline` is wall-clock (`time.time()`): the Denoiser drops the images' jobs past it."""
        started = time.perf_counter()
        cond = await self._condition(plan, deadline)

        async def one_image(index: int) -> tuple[GeneratedImage, DecodedImage, float]:
            request = plan.denoise_request(index, deadline)

            def attempt(number: int):  # a retry re-runs the chain from the text encoder
                return self._image(request, cond if number == 0 else self._encodings(plan, cond.styled, cond.style_ms))

            decoded: DecodedImage = await self.retry.run(attempt, deadline, f"image {index}")
            return await self._encode(plan, request.seed, cond, decoded)

        tasks = [asyncio.ensure_future(one_image(i)) for i in range(plan.n)]
        try:
            outcomes = await asyncio.gather(*tasks)
        except BaseException:  # one image failed for good, or the request was cancelled: stop the rest
            for task in tasks:
                task.cancel()
            for response in (cond.caption, cond.negative, cond.posterior, cond.control):
                if response is not None:
                    response.cancel()
            raise
        return self._result(outcomes, cond, started)

    async def stream(self, plan: RequestPlan, partial_images: int, deadline: float | None = None
                     ) -> AsyncIterator[StepDone | PartialImage | ImageResult]:
        """`run` for one image, step by step: a `StepDone` after every denoising step, a `PartialImage`
        (the VaeDecoder's preview of the Denoiser's clean-latent estimate) at `partial_images` steps spread
        over the run, then the `ImageResult`, whose pixels are those `run` gives. An inpainting preview
        gets the upload pasted back outside the mask as the image does (at the preview's size), so it
        shows the repainted area forming inside an unchanging upload. Closing this generator
        cancels the Denoiser's job. (A stream's items cannot be passed on unresolved, so here the final
        latents, 1 MiB at 1024x1024 (16 x 128 x 128 float32), come through the Ingress on their way to the decoder.) A stream is
        not retried after a replica dies: its events have already reached the client."""
        started = time.perf_counter()
        cond = await self._condition(plan, deadline)
        request = plan.denoise_request(0, deadline)
        updates = self._denoiser_for(request).options(stream=True).denoise_stream.remote(
            request, cond.caption, cond.negative, cond.posterior, partial_images, cond.control
        )
        latents: Latents | None = None
        previews = 0
        preview_overlay = plan.overlay  # scaled to the previews' size at the first one
        try:
            async for update in updates:
                if update.result is not None:
                    latents, tokens = update.result, update.caption_tokens
                    continue
                yield StepDone(update.step, update.steps, time.perf_counter() - started)
                if update.preview is not None:
                    preview: DecodedImage = await self.vae.preview.remote(update.preview)
                    if preview_overlay is not None:
                        preview_overlay = await asyncio.to_thread(preview_overlay.scaled, preview.width,
                                                                  preview.height)
                    data = await asyncio.to_thread(encode_image, preview.pixels, plan, preview_overlay)
                    yield PartialImage(previews, data, preview.width, preview.height)
                    previews += 1
        except BaseException:  # failed, or closed by the consumer: stop the Denoiser's job too
            updates.cancel()
            raise
        if latents is None:
            raise RuntimeError("the Denoiser's stream ended without a result")
        decoded: DecodedImage = await self.vae.decode.remote(latents)
        result = self._result([await self._encode(plan, request.seed, cond, decoded)], cond, started)
        yield replace(result, prompt_tokens=tokens)

    async def _condition(self, plan: RequestPlan, deadline: float | None) -> Conditioning:
        """Style (retried if its replica dies), then start the encodings."""
        started = time.perf_counter()
        styled = await self.retry.run(lambda _: self.styler.style.remote(plan.prompt, plan.style), deadline, "style")
        return self._encodings(plan, styled, (time.perf_counter() - started) * 1000)

    def _encodings(self, plan: RequestPlan, styled: StyledPrompt, style_ms: float) -> Conditioning:
        """The prompt encodings and the upload's encoding, as stage responses not awaited here."""
        guided = plan.guidance_scale > 0
        return Conditioning(
            styled=styled,
            caption=self.text_encoder.encode.remote(styled.text),
            negative=self.text_encoder.encode.remote(plan.negative_prompt) if guided else None,
            # a controlled edit starts from noise: its upload enters the ControlNet masked instead
            posterior=(self.vae.encode.remote(plan.init_image)
                       if plan.init_image is not None and plan.control is None else None),
            style_ms=style_ms,
            control=(self.vae.encode_control.remote(plan.control.image, plan.control.masked)
                     if plan.control is not None else None),
        )

    def _denoiser_for(self, request: DenoiseRequest) -> Any:
        """A request with LoRA adapters goes preferably to a Denoiser replica that holds its adapter set
        (Ray Serve's model multiplexing; the ID: `lora.library.adapter_set_id`)."""
        from deployments.denoiser.lora.library import adapter_set_id

        if not request.loras:
            return self.denoiser
        return self.denoiser.options(multiplexed_model_id=adapter_set_id(lora.name for lora in request.loras))

    async def _image(self, request: DenoiseRequest, cond: Conditioning) -> DecodedImage:
        """One image's denoise and decode; a failure or cancellation cancels both calls."""
        latents = self._denoiser_for(request).denoise.remote(request, cond.caption, cond.negative, cond.posterior,
                                                             cond.control)
        decoded = self.vae.decode.remote(latents)
        try:
            return await decoded
        except BaseException:
            decoded.cancel()
            latents.cancel()
            raise

    @staticmethod
    async def _encode(plan: RequestPlan, seed: int, cond: Conditioning, decoded: DecodedImage
                      ) -> tuple[GeneratedImage, DecodedImage, float]:
        start = time.perf_counter()
        data = await asyncio.to_thread(encode_image, decoded.pixels, plan, plan.overlay)
        image = GeneratedImage(data=data, format=plan.output_format, seed=seed, width=plan.width,
                               height=plan.height, revised_prompt=cond.styled.text, loras=plan.loras)
        return image, decoded, (time.perf_counter() - start) * 1000

    def _result(self, outcomes: list[tuple[GeneratedImage, DecodedImage, float]], cond: Conditioning,
                started: float) -> ImageResult:
        traces = [decoded.trace for _, decoded, _ in outcomes]
        stages = ImageTrace(  # the caption and the upload are encoded once; every image is denoised and decoded
            encode=traces[0].encode, image_encode=traces[0].image_encode,
            denoise=sum((t.denoise for t in traces), StageTime()), decode=sum((t.decode for t in traces), StageTime()),
        )
        timings = Timings(
            total_ms=round((time.perf_counter() - started) * 1000, 2),
            style_ms=round(cond.style_ms, 2),
            output_encode_ms=round(sum(o[2] for o in outcomes), 2),
            **stages.as_ms(),
        )
        return ImageResult(
            images=[image for image, _, _ in outcomes], timings=timings, random_weights=self.random_weights,
            prompt_truncated=outcomes[0][1].prompt_truncated, speed=dict(outcomes[0][1].speed),
        )
