"""An edit's `mask` upload: checked like the image, then planned with it (deployments.inpaint_mask).

OpenAI's convention: a PNG of the image's size whose fully transparent pixels mark where to edit.
Without an alpha channel the mask is read as greyscale, white = edit (diffusers' convention). Every
problem is a 400 (413 for bytes over the cap, as for the image) naming `mask`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image

from serve_app.errors import bad_request
from serve_app.image_io import open_upload

if TYPE_CHECKING:
    from deployments.inpaint_mask import InpaintMask


def decode_mask(data: bytes, image_size: tuple[int, int], max_bytes: int, max_pixels: int) -> Image.Image:
    """The mask as greyscale, 255 = edit, at the size of the upload it belongs to."""
    from deployments.inpaint_mask import mask_from_upload  # torch: imported by the replica (replica_imports)

    upload = open_upload(data, max_bytes, max_pixels, param="mask")
    if upload.size != image_size:
        raise bad_request(f"The mask is {upload.width}x{upload.height} but the image is {image_size[0]}x"
                          f"{image_size[1]}; send a mask of the image's size.", param="mask", code="invalid_mask")
    return mask_from_upload(upload)


def plan_mask(mask: Image.Image, width: int, height: int) -> InpaintMask:
    """The mask after the image's own crop and resize, binarised and on the latents' grid; a mask that
    leaves nothing to edit at that grid is refused rather than returning the upload unchanged."""
    from deployments.inpaint_mask import InpaintMask

    planned = InpaintMask.plan(mask, (width, height))
    if not planned.repaints_anything:
        raise bad_request("The mask marks nothing to edit: make a region fully transparent (or, in a mask "
                          "without alpha, white), at least 8x8 pixels at the generation size.", param="mask",
                          code="invalid_mask")
    return planned
