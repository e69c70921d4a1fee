"""Inpainting in the Denoiser's step: the latent blend of diffusers' `ZImageInpaintPipeline`, per job.

The mask arrives planned (deployments.inpaint_mask, on the request side): `[1, 1, H/8, W/8]` of 1
(repaint) and 0 (keep). The job starts as an image-to-image job (the generator samples the upload's
posterior, then draws the noise); after each Euler step the latents outside the mask are replaced by
the upload's latents noised to the next step's sigma with that same noise, and after the last step by
the upload's latents themselves (`InpaintState.blend`). diffusers also encodes a "masked image" with
the generator, after the noise, but its latents never enter the loop, so it is left out: the seed
still means the same image. The upload's own pixels are pasted back after decoding, outside this
stage (`inpaint_mask.UploadOverlay`).

Plain torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
