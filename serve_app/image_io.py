"""Images in and out of the API: encoding results, and checking uploads before any pixel is decoded."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np

import torch
from PIL import Image

from serve_app.errors import ApiError, bad_request

ALLOWED_UPLOAD_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
PNG_COMPRESS_LEVEL = 1  # zlib level: 1 is several times faster than Pillow's default for a few % more bytes
DEFAULT_LOSSY_QUALITY = 90


def encode_output(pixels: torch.Tensor, output_format: str, compression: int | None) -> bytes:
    """uint8 [H, W, 3] to PNG, JPEG or WebP bytes; `compression` (0-100) sets lossy quality as OpenAI does."""
    if output_format == "png":
        return encode_png(pixels.numpy(), PNG_COMPRESS_LEVEL)
    image = Image.fromarray(pixels.numpy())
    buffer = io.BytesIO()
    quality = DEFAULT_LOSSY_QUALITY if compression is None else max(1, 100 - compression)
    image.save(buffer, format="JPEG" if output_format == "jpeg" else "WEBP", quality=quality)
    return buffer.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """RGB uint8 [H, W, 3] to PNG with the "Up" filter on every row and one zlib pass.

    Pillow tries several filters per row, which costs over 100 ms at 1024x1024 on the request's
    critical path; the Up filter (each row minus the one above) is one vectorised subtraction and
    compresses smooth images nearly as well.
    """
    height, width, _ = pixels.shape
    rows = pixels.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type Up
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:], dtype=np.uint8)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join((
        b"\x89PNG\r\n\x1a\n",
        _png_chunk(b"IHDR", header),
        _png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), level)),
        _png_chunk(b"IEND", b""),
    ))


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
