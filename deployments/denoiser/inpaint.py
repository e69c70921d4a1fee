"""Inpainting: what diffusers' `ZImageInpaintPipeline` computes, cut per job.

The mask (white = edit) is binarised at one half and downsampled to the latents' grid by nearest
neighbour (`latent_mask`), as the pipeline's `mask_processor` and `prepare_mask_latents` do. The job
starts as an image-to-image job (the generator samples the upload's posterior, then draws the noise);
after each Euler step the latents outside the mask are replaced by the upload's latents noised to the
next step's sigma with that same noise, and after the last step by the upload's latents themselves
(`InpaintState.blend`). diffusers also encodes a "masked image" with the generator, after the noise,
but its latents never enter the loop, so it is left out: the seed still means the same image.

Plain torch, no Ray: the Ingress builds the mask, the Denoiser's loop blends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from deployments.geometry import latent_shape

DEFAULT_EDIT_STRENGTH = 0.6  # an edit without a mask
DEFAULT_INPAINT_STRENGTH = 1.0  # with a mask, as diffusers' inpaint pipeline
BINARIZE_AT = 0.5  # diffusers' `VaeImageProcessor.binarize`: a grey level of 128/255 or more is edited


def default_strength(strength: float | None, masked: bool) -> float:
    if strength is not None:
        return strength
    return DEFAULT_INPAINT_STRENGTH if masked else DEFAULT_EDIT_STRENGTH


def mask_from_upload(image: Image.Image) -> Image.Image:
    """A mask upload as a greyscale image, 255 = edit. With an alpha channel (OpenAI's convention) the
    fully transparent pixels are edited and every other is kept; without one, the grey level is the
    mask (white = edit, diffusers' convention)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(image.getchannel("A"))
        return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L")
    return image.convert("L")


def latent_mask(mask: Image.Image) -> torch.Tensor:
    """`[1, 1, H/8, W/8]` float32 of 0 (keep) and 1 (edit) from a greyscale mask already at the
    generation size: binarised, then nearest-neighbour downsampled, as diffusers does."""
    values = torch.from_numpy(np.asarray(mask.convert("L")).astype(np.float32) / 255.0)[None, None]
    binary = torch.where(values < BINARIZE_AT, 0.0, 1.0)
    _, _, height, width = latent_shape(1, mask.width, mask.height)
    return torch.nn.functional.interpolate(binary, size=(height, width), mode="nearest")


@dataclass
class InpaintState:
    """One inpainting job's fixed tensors, on the compute device."""

    mask: torch.Tensor  # [1, 1, h, w] float32, 1 = edit
    image_latents: torch.Tensor  # [1, C, h, w] float32: the upload's sampled latents
    noise: torch.Tensor  # [1, C, h, w] float32: the noise the job started from

    @classmethod
    def create(cls, mask: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor,
               device: torch.device) -> InpaintState:
        if tuple(mask.shape) != (1, 1, *image_latents.shape[2:]):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (1, 1, {image_latents.shape[2]}, "
                             f"{image_latents.shape[3]})")
        return cls(mask=mask.to(device, torch.float32), image_latents=image_latents.to(device, torch.float32),
                   noise=noise.to(device, torch.float32))

    def blend(self, latents: torch.Tensor, sigma_next: torch.Tensor | None) -> torch.Tensor:
        """The latents after a step: the model's inside the mask, the upload's (noised to `sigma_next`,
        or clean after the last step, `None`) outside: diffusers' `scale_noise` and blend."""
        kept = self.image_latents
        if sigma_next is not None:
            kept = sigma_next * self.noise + (1.0 - sigma_next) * kept
        return (1 - self.mask) * kept + self.mask * latents

    def clean_estimate(self, estimate: torch.Tensor) -> torch.Tensor:
        """A preview's clean latents: the model's estimate inside the mask, the upload's outside."""
        return (1 - self.mask) * self.image_latents + self.mask * estimate.to(self.mask.device, torch.float32)
