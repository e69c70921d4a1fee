"""Images in and out of the API: encoding results, and checking uploads before any pixel is decoded."""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image

from serve_app.errors import ApiError, bad_request

ALLOWED_UPLOAD_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
PNG_COMPRESS_LEVEL = 4  # level 9 costs ~5x the time for ~5% fewer bytes at 1024x1024
DEFAULT_LOSSY_QUALITY = 90
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


def encode_output(pixels: torch.Tensor, output_format: str, compression: int | None) -> bytes:
    """uint8 [H, W, 3] to PNG, JPEG or WebP bytes; `compression` (0-100) sets lossy quality as OpenAI does."""
    image = Image.fromarray(pixels.numpy())
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        quality = DEFAULT_LOSSY_QUALITY if compression is None else max(1, 100 - compression)
        image.save(buffer, format="JPEG" if output_format == "jpeg" else "WEBP", quality=quality)
    return buffer.getvalue()


def decode_upload(data: bytes, max_bytes: int, max_pixels: int, param: str = "image") -> Image.Image:
    """Validates an uploaded image and returns it as RGB.

    The format and the pixel count are read from the header before decoding, so a decompression
    bomb is refused without allocating its pixels; a truncated or corrupt file is a 400.
    """
    if len(data) > max_bytes:
        raise ApiError(413, f"The uploaded image is {len(data)} bytes, over the limit of {max_bytes}.", param=param,
                       code="image_too_large")
    if not data:
        raise bad_request("The uploaded image is empty.", param=param, code="invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_UPLOAD_FORMATS:
                raise bad_request(
                    f"Unsupported image format {image.format or 'unknown'}; use PNG, JPEG or WebP.",
                    param=param, code="invalid_image_format",
                )
            width, height = image.size
            if width * height > max_pixels:
                raise bad_request(
                    f"The uploaded image has {width}x{height} pixels, over the limit of {max_pixels}.",
                    param=param, code="image_too_large",
                )
            image.load()
            return image.convert("RGB")
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bad_request(f"The uploaded image has more pixels than the limit of {max_pixels}; it was not decoded.",
                          param=param, code="image_too_large")
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise bad_request(f"The uploaded image could not be decoded ({exc.__class__.__name__}); "
                          "it may be truncated or corrupt.", param=param, code="invalid_image")
