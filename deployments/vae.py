"""VaeDecoder deployment: decodes latents to pixels (tiled for large images) and encodes uploads for edits."""

from __future__ import annotations

import logging

from PIL import Image
from ray import serve

from deployments.core import loading
from deployments.core.contracts import DecodedImage, LatentPosterior, Latents
from deployments.core.vae_codec import VaeCodec
from deployments.settings import ModelSettings
from deployments.stage_base import StageBase, unwrap

logger = logging.getLogger("ray.serve")


@serve.deployment(name="VaeDecoder")
class VaeDecoder(StageBase):
    BATCHED_METHODS = ("_decode_batch", "_encode_batch")

    def __init__(self, settings: dict) -> None:
        self._init_stage("VaeDecoder")
        self.settings = ModelSettings(**settings)
        source, device, dtype = self.settings.source(), self.settings.torch_device(), self.settings.dtype()
        self.codec = VaeCodec(
            loading.load_vae(source, device, dtype),
            device,
            dtype,
            tile_above_px=self.settings.vae_tile_above_px,
            batched_decode=self.settings.vae_batched_decode,
        )
        logger.info("VaeDecoder ready: model=%s device=%s dtype=%s", source.name, device, dtype)

    def reconfigure(self, user_config: dict) -> None:
        self.apply_knobs(user_config)

    async def decode(self, latents: Latents) -> DecodedImage:
        return unwrap(await self._decode_batch(latents))

    async def encode(self, image: Image.Image) -> LatentPosterior:
        """`image` is RGB with sides that are multiples of 16 (the ingress fits uploads first)."""
        return unwrap(await self._encode_batch(image))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _decode_batch(self, items: list[Latents]) -> list[DecodedImage]:
        return await self.run_model("decode", len(items), self.codec.decode, items)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, images: list[Image.Image]) -> list[LatentPosterior]:
        return await self.run_model("encode", len(images), self.codec.encode, images)
