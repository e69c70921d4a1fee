"""Image geometry, in one place: the sizes the model accepts, `WxH` parsing, upload fitting, and the
latent and patch sizes every stage derives from a pixel size.

Pure Python (Pillow only inside `fit_upload`), so that `serve_app.protocol` and the benchmarks'
clients use the same rules without torch.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

SIDE_MULTIPLE = 16
MIN_SIDE = 512
MAX_SIDE = 2048

VAE_SCALE = 8  # pixels per latent cell of the 4-level VAE
PATCH = 2  # latent cells per DiT token side
PIXELS_PER_TOKEN = VAE_SCALE * PATCH  # = SIDE_MULTIPLE: a side that is a multiple of 16 is whole tokens

SIZE_PATTERN = re.compile(r"^(\d{1,5})x(\d{1,5})$")

# The size presets of the original Z-Image-Turbo app.
SIZE_PRESETS: tuple[tuple[int, int], ...] = (
    (1024, 1024), (1344, 768), (768, 1344), (1152, 896), (896, 1152), (1536, 640),
    (1216, 832), (832, 1216), (1536, 1536), (1920, 1088), (1088, 1920), (1536, 1152),
    (1152, 1536), (2048, 2048), (2048, 1152), (1152, 2048), (2048, 1536), (1536, 2048),
)


def parse_size(text: str) -> tuple[int, int]:
    """`"WIDTHxHEIGHT"` (case-insensitive `x`, surrounding spaces allowed) as `(width, height)`."""
    match = SIZE_PATTERN.match(text.strip().lower())
    if not match:
        raise ValueError(f"size {text!r} must look like 'WIDTHxHEIGHT', e.g. '1024x1024'")
    return int(match.group(1)), int(match.group(2))


def format_size(width: int, height: int) -> str:
    return f"{width}x{height}"


def size_problem(width: int, height: int, max_pixels: int) -> str | None:
    """Why a size is not accepted, or None when it is."""
    for name, side in (("width", width), ("height", height)):
        if side % SIDE_MULTIPLE:
            return f"{name} {side} is not a multiple of {SIDE_MULTIPLE}"
        if not MIN_SIDE <= side <= MAX_SIDE:
            return f"{name} {side} is outside {MIN_SIDE}..{MAX_SIDE}"
    if width * height > max_pixels:
        return f"{width}x{height} has {width * height} pixels, over the cap of {max_pixels}"
    return None


def size_rule(max_pixels: int) -> str:
    """The whole rule for a size, as an error message states it (the presets within `max_pixels`)."""
    presets = ", ".join(format_size(w, h) for w, h in SIZE_PRESETS if w * h <= max_pixels)
    return (f"A size is WIDTHxHEIGHT with each side a multiple of {SIDE_MULTIPLE} within {MIN_SIDE}..{MAX_SIDE} "
            f"and at most {max_pixels} pixels in all, such as the presets {presets}")


def latent_shape(channels: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The VAE latents of one image: `[1, C, H/8, W/8]` (whole DiT patches)."""
    return (1, channels, PATCH * (height // PIXELS_PER_TOKEN), PATCH * (width // PIXELS_PER_TOKEN))


def image_tokens(width: int, height: int) -> int:
    """The DiT's image sequence length for one image: one token per 16x16 pixel patch."""
    return (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)


def _round_side(value: float) -> int:
    side = int(round(value / SIDE_MULTIPLE)) * SIDE_MULTIPLE
    return max(MIN_SIDE, min(MAX_SIDE, side))


def fitted_size(width: int, height: int) -> tuple[int, int]:
    """The generation size for an upload: its aspect ratio, each side a multiple of 16 in 512..2048.

    Large images are scaled down until the long side fits, small ones up until the short side does;
    a very elongated image, whose sides cannot both fit, is cropped to the nearest allowed ratio.
    """
    if width <= 0 or height <= 0:
        raise ValueError("image has no pixels")
    scale = 1.0
    if max(width, height) > MAX_SIDE:
        scale = MAX_SIDE / max(width, height)
    if min(width, height) * scale < MIN_SIDE:
        scale = MIN_SIDE / min(width, height)
    return _round_side(width * scale), _round_side(height * scale)


def fit_upload(image: Image.Image, size: tuple[int, int] | None = None, mode: str = "RGB") -> Image.Image:
    """Resizes (and, for extreme ratios, centre-crops) an upload to the generation size, in `mode`
    (an inpainting mask goes through the same crop and resize as its image, in greyscale)."""
    from PIL import Image

    image = image.convert(mode)
    target_w, target_h = size or fitted_size(*image.size)
    src_w, src_h = image.size
    target_ratio, src_ratio = target_w / target_h, src_w / src_h
    if abs(src_ratio / target_ratio - 1) > 0.02:  # beyond rounding to 16: crop, never stretch far
        if src_ratio > target_ratio:  # too wide: crop the sides
            crop_w = round(src_h * target_ratio)
            left = (src_w - crop_w) // 2
            image = image.crop((left, 0, left + crop_w, src_h))
        else:  # too tall: crop top and bottom
            crop_h = round(src_w / target_ratio)
            top = (src_h - crop_h) // 2
            image = image.crop((0, top, src_w, top + crop_h))
    if image.size != (target_w, target_h):
        image = image.resize((target_w, target_h), Image.Resampling.LANCZOS)
    return image
