"""VaeDecoder deployment: decodes latents to pixels (tiled for large images) and encodes uploads for edits."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from functools import partial

from typing import TYPE_CHECKING

from pydantic import Field

from deployments.contracts import (
    ControlLatents,
    DecodedImage,
    ImageTrace,
    LatentPosterior,
    Latents,
    MaskedUpload,
    StageTime,
)
from deployments.runtime.background_warmup import WarmupStep
from deployments.runtime.model_stage import ModelStage, model_stage_deployment
from deployments.runtime.stage import StageConfig

if TYPE_CHECKING:
    from PIL import Image


class VaeDecoderConfig(StageConfig):
    max_batch_size: int = Field(4, ge=1, le=256)


# num_gpus: a share of one H200 (tiled 2048x2048 decodes peak at a few GB).
@model_stage_deployment("VaeDecoder", num_gpus=0.2, max_ongoing_requests=32)
class VaeDecoder(ModelStage):
    config_model = VaeDecoderConfig
    speed_part = "vae"
    model_modules = (*ModelStage.model_modules, "diffusers:AutoencoderKL", "deployments.vae.codec")
    # its compile module: in `optimize`, when it compiles

    @property
    def compiled(self) -> bool:
        return self.speed.vae_compile.value

    def load(self) -> None:
        from deployments.weights import loading  # the model code: imported by the replica, not the builder

        self.vae = loading.load_vae(self.source, self.device, self.dtype)

    def optimize(self) -> None:
        """Channels-last and, with `vae_compile`, the compiled decoder: its compiled code cached under
        the node's ZIMAGE_CACHE_DIR as the other stages' (a new pod with that volume compiles nothing),
        its dynamic graph compiled after ready (`warm_up_after_ready`)."""
        from deployments.vae.codec import VaeCodec

        if self.compiled:
            from deployments.runtime.compile_cache import configure_compile_cache, load_compile_artifacts
            from deployments.vae.compile import optimize_vae

            self.artifacts = self.compile_cache()
            configure_compile_cache(self.artifacts)
            load_compile_artifacts(self.artifacts, "vae")
            self.vae = optimize_vae(self.vae, compile=True, channels_last=True, dynamic_warm=False)
        self.codec = VaeCodec(
            self.vae,
            self.device,
            self.dtype,
            tile_above_px=self.settings.vae_tile_above_px,
            batched_decode=self.settings.vae_batched_decode,
            tile_px=self.settings.vae_tile_px,
            tile_overlap=self.settings.vae_tile_overlap,
        )
        self.decoding = self.add_batcher("decode", self.codec.decode)
        self.encoding = self.add_batcher("encode", self.codec.encode)
        self.previewing = self.add_batcher("preview", self.codec.preview)

    def _decode(self, width: int, height: int) -> None:
        import torch

        from deployments.geometry import latent_shape

        z = torch.randn(latent_shape(16, width, height))
        self.codec.decode([Latents(latents=z, width=width, height=height)])

    def warm_up(self) -> None:
        """Static graphs for the warm-up sizes (and their tiles), compiled before the replica reports
        ready: the sizes most requests ask for decode at full speed from the first request. Uploads
        are encoded eagerly (see `optimize_vae`), so edits need no warm-up."""
        if not self.compiled:
            return
        with self.codec.vae.decoder.forward.recording_static():  # vae_compile's StaticOrDynamicDecoder
            for width, height in self.settings.warmup_pixels():
                self._decode(width, height)
        if not self.settings.vae_dynamic_in_background:
            for _, step in self._dynamic_steps():
                step()

    def warm_up_after_ready(self) -> list[WarmupStep]:
        """The dynamic graph (unless `vae_dynamic_in_background` is off) and then, on a GPU, every
        preset and warm-up size decoded, previewed and encoded once (`vae.size_warmup`): their
        convolution plans are made per shape."""
        from deployments.geometry import SIZE_PRESETS
        from deployments.vae.size_warmup import size_steps

        steps = self._dynamic_steps() if self.settings.vae_dynamic_in_background else []
        if self.device.type == "cuda":
            static = self.settings.warmup_pixels() if self.compiled else []  # `warm_up`'s static graphs
            steps += size_steps(self.codec, SIZE_PRESETS, static)
        return steps

    def _dynamic_steps(self) -> list[WarmupStep]:
        """The dynamic graph that every other size uses (by default compiled after ready, one call at
        a time between requests; such sizes decode eagerly until then, compiling nothing on a
        request): on untiled sizes at the extremes of the API's range, then on a ladder of tile
        shapes (`dynamic_warmup_shapes`) covering every edge tile a tiled decode cuts. Before ready,
        the VAE's whole compile, this graph's included, took 60.0 s (commit 44fa306) and 82.1 s
        (2026-11-30) of a cold start on an H200 (benchmarks/RESULTS.md)."""
        if not self.compiled:
            return []
        from deployments.geometry import MAX_SIDE, MIN_SIDE
        from deployments.vae.compile import dynamic_warmup_shapes

        sizes = self.settings.warmup_pixels()
        width, height = sizes[0] if sizes else (512, 512)
        while (width, height) in sizes:
            width += 16
        long_side = min(MAX_SIDE, self.codec.tile_above_px // MIN_SIDE)  # the longest untiled image
        untiled = [s for s in dict.fromkeys([(width, height), (long_side, MIN_SIDE), (MIN_SIDE, long_side)])
                   if s not in sizes]
        steps: list[WarmupStep] = [(f"{w}x{h}", partial(self._warm_dynamic, self._decode, w, h)) for w, h in untiled]
        steps += [(f"tile/{h}x{w}", partial(self._warm_dynamic, self._decode_tile, h, w))
                  for h, w in dynamic_warmup_shapes(self.codec.vae.tile_latent_min_size)]
        steps.append(("done", self._dynamic_ready))
        return steps

    def _warm_dynamic(self, decode, *size: int) -> None:
        with self.codec.vae.decoder.forward.warming_dynamic():
            decode(*size)

    def _decode_tile(self, h: int, w: int) -> None:
        import torch

        with torch.inference_mode():
            channels = self.codec.vae.config.latent_channels
            self.codec.vae.decoder(torch.randn(1, channels, h, w, device=self.codec.device, dtype=self.codec.dtype))

    def _dynamic_ready(self) -> None:
        from deployments.runtime.compile_cache import save_compile_artifacts

        self.codec.vae.decoder.forward.dynamic_warm = True
        save_compile_artifacts(self.artifacts, "vae")

    def ready_line(self) -> str:
        compiled = f" compiled={self.compiled}" if self.device.type == "cuda" else ""  # the CPU runs eager
        return f"{super().ready_line()} dtype={self.dtype}{compiled}"

    async def decode(self, latents: Latents) -> DecodedImage:
        """Takes the Denoiser's result straight from it (the Ingress passes the response on)."""
        start = time.perf_counter()
        decoded, queued_s = await self.decoding.submit_timed(latents)
        trace = replace(latents.trace, decode=StageTime.since(start, queued_s))
        return DecodedImage(pixels=decoded.pixels, width=decoded.width, height=decoded.height, trace=trace,
                            prompt_truncated=latents.prompt_truncated, speed={**latents.speed, self.speed_part: self.speed_label})

    async def preview(self, latents: Latents) -> DecodedImage:
        """A streamed request's partial image from the Denoiser's clean-latent estimate (see `VaeCodec.preview`)."""
        return await self.previewing.submit(latents)

    async def encode(self, image: Image.Image) -> LatentPosterior:
        """`image` is RGB with sides that are multiples of 16 (the ingress fits uploads first)."""
        start = time.perf_counter()
        posterior, queued_s = await self.encoding.submit_timed(image)
        return replace(posterior, trace=ImageTrace(image_encode=StageTime.since(start, queued_s)))

    async def encode_control(self, image: Image.Image, masked: MaskedUpload | None = None) -> ControlLatents:
        """A controlled job's latents (`ControlLatents`): the control image's and, for control with a
        mask, the masked upload's, through the same batched encoder as uploads."""
        posteriors = await asyncio.gather(*(self.encoding.submit(item) for item in (image, masked) if item is not None))
        return ControlLatents(control=posteriors[0].mode(),
                              masked_image=posteriors[1].mode() if masked is not None else None)
