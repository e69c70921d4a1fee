"""VaeDecoder deployment: decodes latents to pixels (tiled for large images) and encodes uploads for edits."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from PIL import Image
from pydantic import Field
from ray import serve

from deployments.weights import loading
from deployments.contracts import DecodedImage, ImageTrace, LatentPosterior, Latents, StageTime
from deployments.vae.codec import VaeCodec
from deployments.settings import ModelSettings
from deployments.runtime.stage import StageBase, StageConfig

logger = logging.getLogger("ray.serve")


class VaeDecoderConfig(StageConfig):
    max_batch_size: int = Field(4, ge=1, le=256)


@serve.deployment(
    name="VaeDecoder",
    # num_gpus: a share of one H200 (tiled 2048x2048 decodes peak at a few GB); 0 where no GPU is in use.
    ray_actor_options={"num_cpus": 0.25, "num_gpus": 0.2},
    max_ongoing_requests=32,
    max_queued_requests=256,
    graceful_shutdown_timeout_s=30,  # a replica Serve stops finishes its queued decodes first
)
class VaeDecoder(StageBase):
    config_model = VaeDecoderConfig

    def __init__(self, settings: dict, base_config: dict | None = None) -> None:
        self._init_stage("VaeDecoder", base_config)
        self.settings = ModelSettings(**settings)
        source, device, dtype = self.settings.source(), self.settings.torch_device(), self.settings.dtype()
        with self.start_phases.phase("load"):
            vae = loading.load_vae(source, device, dtype)
        if device.type == "cuda" and self.settings.vae_compile:
            from deployments.vae.compile import optimize_vae

            vae = optimize_vae(vae, compile=True, channels_last=True)
        self.codec = VaeCodec(
            vae,
            device,
            dtype,
            tile_above_px=self.settings.vae_tile_above_px,
            batched_decode=self.settings.vae_batched_decode,
            tile_px=self.settings.vae_tile_px,
            tile_overlap=self.settings.vae_tile_overlap,
        )
        self.decoding = self.add_batcher("decode", self.codec.decode)
        self.encoding = self.add_batcher("encode", self.codec.encode)
        self.previewing = self.add_batcher("preview", self.codec.preview)
        if device.type == "cuda" and self.settings.vae_compile:
            self.gpu_lane.run_blocking(self._warmup)  # on the thread that serves
        logger.info("VaeDecoder ready: model=%s device=%s dtype=%s", source.name, device, dtype)
        self.serving()

    def _warmup(self) -> None:
        """Compiles the decoder before the replica reports ready, so no accepted size compiles on a
        request: static graphs for the configured sizes (and their tiles); then the dynamic graph
        that every other size uses, on untiled sizes at the extremes of the API's range and on a
        ladder of tile shapes (`dynamic_warmup_shapes`) covering every edge tile a tiled decode cuts.
        Uploads are encoded eagerly (see `optimize_vae`), so edits need no warm-up."""
        import torch

        from deployments.geometry import latent_shape
        from deployments.geometry import MAX_SIDE, MIN_SIDE
        from deployments.vae.compile import dynamic_warmup_shapes

        def decode(width: int, height: int) -> None:
            z = torch.randn(latent_shape(16, width, height))
            self.codec.decode([Latents(latents=z, width=width, height=height)])

        sizes = self.settings.warmup_pixels()
        with self.start_phases.phase("warmup"):
            with self.codec.vae.decoder.forward.recording_static():  # vae_compile's StaticOrDynamicDecoder
                for width, height in sizes:
                    decode(width, height)
            width, height = sizes[0] if sizes else (512, 512)
            while (width, height) in sizes:
                width += 16
            long_side = min(MAX_SIDE, self.codec.tile_above_px // MIN_SIDE)  # the longest untiled image
            for size in [(width, height), (long_side, MIN_SIDE), (MIN_SIDE, long_side)]:
                if size not in sizes:
                    decode(*size)
            with torch.inference_mode():
                for h, w in dynamic_warmup_shapes(self.codec.vae.tile_latent_min_size):
                    channels = self.codec.vae.config.latent_channels
                    self.codec.vae.decoder(torch.randn(1, channels, h, w, device=self.codec.device,
                                                       dtype=self.codec.dtype))

    async def decode(self, latents: Latents) -> DecodedImage:
        """Takes the Denoiser's result straight from it (the Ingress passes the response on)."""
        start = time.perf_counter()
        decoded, queued_s = await self.decoding.submit_timed(latents)
        trace = replace(latents.trace, decode=StageTime.since(start, queued_s))
        return DecodedImage(pixels=decoded.pixels, width=decoded.width, height=decoded.height, trace=trace,
                            prompt_truncated=latents.prompt_truncated)

    async def preview(self, latents: Latents) -> DecodedImage:
        """A streamed request's partial image from the Denoiser's clean-latent estimate (see `VaeCodec.preview`)."""
        return await self.previewing.submit(latents)

    async def encode(self, image: Image.Image) -> LatentPosterior:
        """`image` is RGB with sides that are multiples of 16 (the ingress fits uploads first)."""
        start = time.perf_counter()
        posterior, queued_s = await self.encoding.submit_timed(image)
        return replace(posterior, trace=ImageTrace(image_encode=StageTime.since(start, queued_s)))
