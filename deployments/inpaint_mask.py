"""An inpainting mask, planned once per request on the request side: no model, no Ray.

A mask upload (OpenAI's convention: fully transparent = repaint; without alpha, diffusers': white =
repaint) becomes greyscale (`mask_from_upload`), is fitted to the generation size with its image
(`deployments.geometry.fit_upload`) and binarised at one half (`InpaintMask.plan`). From that one
fitted mask come both things the request needs:

- `latents`: the mask on the latents' grid (nearest neighbour, as diffusers' `mask_processor` and
  `prepare_mask_latents`), which travels in the `DenoiseRequest`; the Denoiser's step blends with it
  (deployments.denoiser.inpaint);
- `overlay(upload)`: the upload's own pixels pasted over the decoded image through the mask blurred
  by `OVERLAY_BLUR_PX` (diffusers' `VaeImageProcessor.blur`, then what its `apply_overlay` does), so
  that outside the mask the output is the upload itself, not the VAE's round trip of it. The blend
  between the two is a band of `OVERLAY_BAND_PX` pixels on each side of the mask's edge.

Where the paste runs: where the decoded pixels and the fitted upload already meet, the Ingress
(serve_app.pipeline; in one process, deployments.local_pipeline). The Ingress fitted the upload and
receives every decoded image, so the paste moves no byte between replicas; done in the VaeDecoder, the
upload would travel a second time (to the decoder replica, not the encoder's). It costs a blur and a
paste per request and one alpha composite per image (`UploadOverlay`), tens of milliseconds at
1024x1024 on one CPU core, on a worker thread beside the output encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from deployments.geometry import fit_upload, latent_shape

DEFAULT_EDIT_STRENGTH = 0.6  # an edit without a mask
DEFAULT_INPAINT_STRENGTH = 1.0  # with a mask, as diffusers' inpaint pipeline
BINARIZE_AT = 128  # diffusers' `VaeImageProcessor.binarize` (0.5 of 255): a grey level of 128 or more is repainted
OVERLAY_BLUR_PX = 4  # the Gaussian's radius: diffusers' `VaeImageProcessor.blur` default `blur_factor`
OVERLAY_BAND_PX = 10  # how far the blurred edge reaches on each side (PIL's Gaussian of radius 4, measured)


def default_strength(strength: float | None, masked: bool) -> float:
    if strength is not None:
        return strength
    return DEFAULT_INPAINT_STRENGTH if masked else DEFAULT_EDIT_STRENGTH


def mask_from_upload(image: Image.Image) -> Image.Image:
    """A mask upload as a greyscale image, 255 = repaint. With an alpha channel (OpenAI's convention)
    the fully transparent pixels are repainted and every other is kept; without one, the grey level is
    the mask (white = repaint, diffusers' convention)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(image.getchannel("A"))
        return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L")
    return image.convert("L")


def binarize(mask: Image.Image) -> Image.Image:
    """0 (keep) or 255 (repaint), cut where diffusers cuts."""
    return Image.fromarray(np.where(np.asarray(mask.convert("L")) >= BINARIZE_AT, 255, 0).astype(np.uint8), mode="L")


def latent_mask(mask: Image.Image) -> torch.Tensor:
    """`[1, 1, H/8, W/8]` float32 of 0 (keep) and 1 (repaint) from a greyscale mask already at the
    generation size: binarised, then nearest-neighbour downsampled, as diffusers does."""
    binary = torch.from_numpy(np.asarray(binarize(mask)) / np.float32(255))[None, None]
    _, _, height, width = latent_shape(1, mask.width, mask.height)
    return torch.nn.functional.interpolate(binary, size=(height, width), mode="nearest")


@dataclass(frozen=True)
class UploadOverlay:
    """The fitted upload and where it is kept: `keep` 255 = the upload's pixel, 0 = the generated one,
    the levels between blend them (the blurred mask's edge). `pasted` is the upload through `keep` as
    diffusers' `apply_overlay` builds it (premultiplied, then back to RGBA), made once per request:
    each image is then one alpha composite, and the output is that method's bit for bit."""

    upload: Image.Image  # RGB
    keep: Image.Image  # greyscale, the upload's size
    pasted: Image.Image  # RGBA, the upload's size

    @classmethod
    def create(cls, upload: Image.Image, keep: Image.Image) -> UploadOverlay:
        pasted = Image.new("RGBa", upload.size)
        pasted.paste(upload.convert("RGBA").convert("RGBa"), mask=keep)
        return cls(upload=upload, keep=keep, pasted=pasted.convert("RGBA"))

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Decoded `[H, W, 3]` uint8 (at the upload's size) with the upload pasted over it."""
        if pixels.shape[1::-1] != self.upload.size:
            raise ValueError(f"pixels of {pixels.shape[1]}x{pixels.shape[0]} for an overlay of "
                             f"{self.upload.width}x{self.upload.height}")
        image = Image.fromarray(np.ascontiguousarray(pixels)).convert("RGBA")
        image.alpha_composite(self.pasted)
        return np.array(image.convert("RGB"))

    def scaled(self, width: int, height: int) -> UploadOverlay:
        """The same paste at another size (a streamed preview's): upload and band box-filtered to it."""
        if (width, height) == self.upload.size:
            return self
        return UploadOverlay.create(self.upload.resize((width, height), Image.Resampling.BOX),
                                    self.keep.resize((width, height), Image.Resampling.BOX))


@dataclass(frozen=True)
class InpaintMask:
    """A request's mask at the generation size, binarised (`fitted`: 255 = repaint), and on the
    latents' grid (`latents`: 1 = repaint)."""

    fitted: Image.Image
    latents: torch.Tensor

    @classmethod
    def plan(cls, mask: Image.Image, size: tuple[int, int]) -> InpaintMask:
        """`mask` (greyscale at the upload's size, `mask_from_upload`) through the upload's own crop and
        resize to `size`, then binarised."""
        fitted = binarize(fit_upload(mask, size, mode="L"))
        return cls(fitted=fitted, latents=latent_mask(fitted))

    @property
    def repaints_anything(self) -> bool:
        """False when no latent cell is repainted: such a mask would return the upload unchanged."""
        return bool(self.latents.any())

    def overlay(self, upload: Image.Image) -> UploadOverlay:
        """The paste of `upload` (fitted to the same size) outside this mask, feathered at its edge."""
        blurred = self.fitted.filter(ImageFilter.GaussianBlur(OVERLAY_BLUR_PX))  # = VaeImageProcessor.blur
        return UploadOverlay.create(upload.convert("RGB"), ImageOps.invert(blurred))
