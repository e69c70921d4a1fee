"""The VAE stage's maths: latents to pixels (tiled above a size threshold), pixels to a posterior.

Decoding undoes the DiT's latent normalisation (`latents / scaling + shift`) and converts to uint8
exactly as diffusers' `VaeImageProcessor.postprocess` does. Encoding returns the Gaussian posterior;
the Denoiser samples it with the job's seed (see `LatentPosterior`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from deployments.contracts import DecodedImage, LatentPosterior, Latents, MaskedUpload

DEFAULT_TILE_ABOVE_PX = 1024 * 1024
DEFAULT_TILE_PX = 1024  # diffusers' own tile for this VAE (its sample_size)
DEFAULT_TILE_OVERLAP = 0.25
PREVIEW_POOL = 2  # a streamed preview is decoded at 1/PREVIEW_POOL of the image's side


class VaeCodec:
    def __init__(
        self,
        vae,
        device: torch.device,
        dtype: torch.dtype,
        tile_above_px: int = DEFAULT_TILE_ABOVE_PX,
        batched_decode: bool = False,
        tile_px: int = DEFAULT_TILE_PX,
        tile_overlap: float = DEFAULT_TILE_OVERLAP,
    ):
        """`batched_decode` runs same-size images through the decoder together. It is off by default:
        GroupNorm and convolution kernels pick different reduction orders for different batch sizes,
        so only one image per call keeps an image independent of its batch to the last bit."""
        self.vae = vae
        self.batched_decode = batched_decode
        self.device = device
        self.dtype = dtype
        self.tile_above_px = tile_above_px
        # Tiles of `tile_px` overlapping by `tile_overlap`: fewer, larger tiles cost less per pixel
        # (a 2048x2048 image is 2x2 tiles of 1280 with overlap 0.2, instead of 3x3 tiles of 1024).
        vae.tile_sample_min_size = tile_px
        vae.tile_latent_min_size = tile_px // 8
        vae.tile_overlap_factor = tile_overlap
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor)

    def needs_tiling(self, width: int, height: int) -> bool:
        return width * height > self.tile_above_px

    @torch.inference_mode()
    def decode(self, items: Sequence[Latents]) -> list[DecodedImage]:
        """Decodes a batch of latents (any mix of sizes) to uint8 images."""
        results: list[DecodedImage | None] = [None] * len(items)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault((item.width, item.height), []).append(index)
        for (width, height), indices in groups.items():
            tiled = self.needs_tiling(width, height)
            chunks = [indices] if self.batched_decode and not tiled else [[i] for i in indices]
            for chunk in chunks:
                z = torch.cat([items[i].latents for i in chunk]).to(self.device, self.dtype)
                z = z / self.scaling_factor + self.shift_factor
                pixels = self.vae.tiled_decode(z).sample if tiled else self.vae.decode(z).sample
                for i, image in zip(chunk, to_uint8(pixels)):
                    results[i] = DecodedImage(pixels=image, width=width, height=height)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def preview(self, items: Sequence[Latents]) -> list[DecodedImage]:
        """Cheap previews for streaming: the real decoder on latents average-pooled 2x2, so an image of
        half the side (a quarter of the decoder's work: 512x512 for a 1024x1024 request) that is never
        tiled. Blurrier than the final decode, but the model's own colours and shapes; the cost per
        preview is what `benchmarks/bench_preview.py` measures."""
        results = []
        for item in items:
            z = torch.nn.functional.avg_pool2d(item.latents.to(self.device, self.dtype), PREVIEW_POOL)
            pixels = self.vae.decode(z / self.scaling_factor + self.shift_factor).sample
            results.append(DecodedImage(pixels=to_uint8(pixels)[0], width=item.width // PREVIEW_POOL,
                                        height=item.height // PREVIEW_POOL))
        return results

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image | MaskedUpload]) -> list[LatentPosterior]:
        """Posteriors of RGB images whose sides are already multiples of 16 (see `fit_upload`); a
        `MaskedUpload` is encoded with its pixels to repaint zeroed."""
        posteriors = []
        for image in images:
            if isinstance(image, MaskedUpload):
                pixels = masked_pixels(image)
            else:
                pixels = pil_to_tensor(image)
            pixels = pixels.to(self.device, self.dtype)
            dist = self.vae.encode(pixels).latent_dist
            posteriors.append(
                LatentPosterior(
                    mean=dist.mean.float().cpu(),
                    std=dist.std.float().cpu(),
                    shift_factor=self.shift_factor,
                    scaling_factor=self.scaling_factor,
                )
            )
        return posteriors


def to_uint8(pixels: torch.Tensor) -> list[torch.Tensor]:
    """[-1, 1] NCHW to uint8 NHWC on the CPU, rounding as diffusers' postprocess does.

    The arithmetic runs in float32 where the pixels are (the same IEEE operations diffusers runs on
    the CPU), so only uint8 crosses to the host: a quarter of the bytes, and no CPU pass over floats.
    """
    images = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return list(images.permute(0, 2, 3, 1).cpu())


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a contiguous [1, 3, H, W] tensor in [-1, 1], as diffusers' preprocess does.

    Contiguous as the tensors diffusers' pipelines encode (their `prepare_image` copies): the CPU's
    convolutions pick another algorithm, and round otherwise, for a channels-last layout."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
    return 2.0 * tensor - 1.0


def masked_pixels(upload: MaskedUpload) -> torch.Tensor:
    """The upload in [-1, 1] with its pixels to repaint zeroed, by diffusers' own steps: the mask through
    a binarising greyscale `VaeImageProcessor`, tiled to three channels, then `image * (mask < 0.5)`."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    mask = processor.preprocess(upload.mask, height=upload.mask.height, width=upload.mask.width)
    return pil_to_tensor(upload.image) * (torch.tile(mask, [1, 3, 1, 1]) < 0.5)
