"""Images in and out of the API: encoding results, and checking uploads before any pixel is decoded."""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import struct
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from serve_app.errors import ApiError, bad_request

if TYPE_CHECKING:  # the replica imports both before it is ready (serve_app.replica_imports)
    import torch

ALLOWED_UPLOAD_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
PNG_COMPRESS_LEVEL = 1  # zlib level: 1 is several times faster than Pillow's default for a few % more bytes
DEFAULT_LOSSY_QUALITY = 90
# Filtered PNG data from this size up is deflated on several threads; below it, one thread (a small
# image gains less than the thread hand-offs cost).
PNG_PARALLEL_MIN_BYTES = 64 * 1024
# Threads of the one PNG pool; the CPUs this process may run on (not Ray's num_cpus), at most 8.
PNG_WORKERS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def encode_output(pixels: torch.Tensor, output_format: str, compression: int | None) -> bytes:
    """uint8 [H, W, 3] to PNG, JPEG or WebP bytes; `compression` (0-100) sets lossy quality as OpenAI does.

    Each format goes through the writer that measured fastest on both a 2-core CPU and an H200 host
    (benchmarks/bench_codecs.py; RESULTS.md "Output encoding"): PNG through our threaded writer (at
    1024x1024 3.0x imagecodecs' speed at the same zlib level on the 2-core CPU, 7.0x on the H200
    host), JPEG through imagecodecs (the very bytes Pillow writes, faster, and 2.3x and 3.7x the
    throughput on 4 threads), WebP through Pillow (no writer was faster on both).
    """
    if output_format == "png":
        return encode_png(pixels.numpy(), PNG_COMPRESS_LEVEL)
    quality = DEFAULT_LOSSY_QUALITY if compression is None else max(1, 100 - compression)
    if output_format == "jpeg":
        import imagecodecs

        # the decoder's pixels are a permuted (non-contiguous) view; libjpeg reads rows contiguously
        return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(pixels.numpy()), level=quality))
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """RGB uint8 [H, W, 3] to PNG with the "Up" filter on every row, deflated in parallel when large.

    Pillow tries several filters per row, a cost on the request's critical path; the Up filter (each row minus the one above) is one vectorised subtraction and
    compresses smooth images nearly as well. Deflate is then the whole cost, so it is split over
    threads (see `_deflate_parallel`).
    """
    height, width, _ = pixels.shape
    rows = pixels.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type Up
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:], dtype=np.uint8)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    if filtered.nbytes < PNG_PARALLEL_MIN_BYTES or height < 2 or PNG_WORKERS < 2:
        idat = [_png_chunk(b"IDAT", zlib.compress(filtered, level))]
    else:
        idat = _deflate_parallel(filtered, level)
    return b"".join((b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header), *idat, _png_chunk(b"IEND", b"")))


# Parallel deflate, as pigz does: row-aligned pieces are raw-deflated on threads (zlib releases the
# GIL), every piece but the last ends in a sync flush (byte-aligned, so the pieces concatenate into one
# deflate stream) and is primed with the 32 KiB before it (so the split costs almost no ratio). Each
# piece goes out as its own IDAT chunk (a PNG decoder concatenates them), so the chunk CRCs and the
# adler32 are computed on the threads too; only a few-byte combine runs serially.
_PNG_MIN_PIECE_BYTES = 32 * 1024
_DEFLATE_WINDOW = 32 * 1024
_ADLER_MOD = 65521
_png_pool: ThreadPoolExecutor | None = None
_png_pool_lock = threading.Lock()


def _png_executor() -> ThreadPoolExecutor:
    """One pool for the process, made on first use; shared by concurrent requests."""
    global _png_pool
    with _png_pool_lock:
        if _png_pool is None:
            _png_pool = ThreadPoolExecutor(max_workers=PNG_WORKERS, thread_name_prefix="png-deflate")
        return _png_pool


def _zlib_header(level: int) -> bytes:
    """CMF/FLG of a zlib stream with a 32 KiB window and the FLEVEL that zlib itself writes for `level`."""
    level = 6 if level == -1 else level
    cmf, flg = 0x78, (0 if level < 2 else 1 if level < 6 else 2 if level == 6 else 3) << 6
    flg += (31 - (cmf << 8 | flg) % 31) % 31
    return bytes((cmf, flg))


def _adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """adler32 of A + B from adler32(A), adler32(B) and len(B), as zlib's adler32_combine."""
    a = ((adler1 & 0xFFFF) + (adler2 & 0xFFFF) - 1) % _ADLER_MOD
    b = ((adler1 >> 16) + (adler2 >> 16) + len2 * ((adler1 & 0xFFFF) - 1)) % _ADLER_MOD
    return (b << 16) | a


def _deflate_piece(piece: np.ndarray, window: np.ndarray, level: int, last: bool, prefix: bytes
                   ) -> tuple[bytes, int, int]:
    """(raw deflate of `piece`, adler32 of `piece`, running CRC of its IDAT chunk over tag + prefix + deflate)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15, zdict=window)
    data = compressor.compress(piece) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
    return data, zlib.adler32(piece), zlib.crc32(data, zlib.crc32(prefix, zlib.crc32(b"IDAT")))


def _deflate_parallel(filtered: np.ndarray, level: int) -> list[bytes]:
    """The zlib stream of `filtered` ([H, row bytes] uint8) as IDAT chunks, one per piece."""
    height, row_bytes = filtered.shape
    pieces = max(2, min(PNG_WORKERS, height, filtered.nbytes // _PNG_MIN_PIECE_BYTES))
    starts = [height * i // pieces * row_bytes for i in range(pieces + 1)]
    flat = filtered.reshape(-1)
    header = _zlib_header(level)
    jobs = [(flat[a:b], flat[max(0, a - _DEFLATE_WINDOW):a], level, b == flat.size, header if a == 0 else b"")
            for a, b in zip(starts, starts[1:])]
    pool = _png_executor()
    futures = [pool.submit(_deflate_piece, *job) for job in jobs[1:]]
    results = [_deflate_piece(*jobs[0])] + [f.result() for f in futures]  # piece 0 on this thread
    adler = results[0][1]
    for (_, piece_adler, _), job in zip(results[1:], jobs[1:]):
        adler = _adler32_combine(adler, piece_adler, len(job[0]))
    trailer = struct.pack(">I", adler)
    chunks = []
    for (data, _, crc), (_, _, _, last, prefix) in zip(results, jobs):
        suffix = trailer if last else b""
        chunks += [struct.pack(">I", len(prefix) + len(data) + len(suffix)), b"IDAT", prefix, data, suffix,
                   struct.pack(">I", zlib.crc32(suffix, crc))]
    return chunks


def json_with_base64_images(payload: dict, images: list[bytes]) -> bytes:
    """The JSON text of an images response whose `data[i].b64_json` is the base64 of `images[i]`.

    Base64 needs no JSON escaping, so it is spliced in as bytes instead of going through the JSON
    encoder, which would scan and copy megabytes of it.
    Each image's field holds a random marker while the rest is encoded.
    """
    marker = secrets.token_hex(16)
    for index, item in enumerate(payload["data"]):
        item["b64_json"] = f"{marker}-{index}"
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    pieces = []
    for index, image in enumerate(images):
        before, text = text.split(f'"{marker}-{index}"'.encode("ascii"), 1)
        pieces += [before, b'"', base64.b64encode(image), b'"']
    pieces.append(text)
    return b"".join(pieces)


def byte_size(count: int) -> str:
    """`20971520` as "20 MiB (20971520 bytes)"; a count that is no whole MiB or KiB as bytes alone."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale and count % scale == 0:
            return f"{count // scale} {unit} ({count} bytes)"
    return f"{count} bytes"


def decode_upload(data: bytes, max_bytes: int, max_pixels: int, param: str = "image") -> Image.Image:
    """Validates an uploaded image and returns it as RGB (see `open_upload`)."""
    return open_upload(data, max_bytes, max_pixels, param).convert("RGB")


def open_upload(data: bytes, max_bytes: int, max_pixels: int, param: str = "image") -> Image.Image:
    """Validates an uploaded image and returns it decoded, in its own mode (a mask's alpha is kept).

    The format and the pixel count are read from the header before decoding, so a decompression
    bomb is refused without allocating its pixels; a truncated or corrupt file is a 400.
    """
    if len(data) > max_bytes:  # the body is read only to the cap and one byte more: its size is not known here
        raise ApiError(413, f"The uploaded image is over the limit of {byte_size(max_bytes)}.", param=param,
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
            return image
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bad_request(f"The uploaded image has more pixels than the limit of {max_pixels}; it was not decoded.",
                          param=param, code="image_too_large")
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise bad_request(f"The uploaded image could not be decoded ({exc.__class__.__name__}); "
                          "it may be truncated or corrupt.", param=param, code="invalid_image")
