"""Output encoding: our PNG writer round-trips exactly, on one thread or several; lossy formats have their magic."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app import image_io
from serve_app.image_io import encode_output, encode_png


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(tag, payload) of every chunk, checking each CRC on the way."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + payload), f"bad CRC on {tag!r}"
        chunks.append((tag, payload))
        pos += 12 + length
    assert pos == len(data) and chunks[-1] == (b"IEND", b"")
    return chunks


def check_png(data: bytes, pixels: np.ndarray) -> int:
    """Pillow decodes exactly `pixels`, and the IDAT data is a valid zlib stream (adler32 included) of
    the Up-filtered rows; returns the number of IDAT chunks."""
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG" and decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), pixels)
    idat = [payload for tag, payload in png_chunks(data) if tag == b"IDAT"]
    raw = zlib.decompress(b"".join(idat))  # raises on a bad header, deflate stream or adler32
    height, width, _ = pixels.shape
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, width * 3 + 1)
    assert (rows[:, 0] == 2).all()
    assert np.array_equal(np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8), pixels.reshape(height, -1))
    return len(idat)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def smooth(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("shape", [(512, 512), (48, 80), (1, 16), (1, 30_000), (2, 20_000), (333, 517), (1023, 1)])
@pytest.mark.parametrize("kind", [noise, smooth])
def test_png_round_trips_exactly(shape, kind):
    pixels = kind(*shape)
    idat_chunks = check_png(encode_png(pixels), pixels)
    parallel = pixels.size + shape[0] >= image_io.PNG_PARALLEL_MIN_BYTES and shape[0] > 1 and image_io.PNG_WORKERS > 1
    assert (idat_chunks > 1) == parallel  # one IDAT per piece on the parallel path, one on the single-call path


@pytest.mark.parametrize("height,width", [(2, 3), (3, 1), (7, 5), (9, 11), (64, 33)])
@pytest.mark.parametrize("level", [0, 1, 6, 9, -1])
def test_parallel_path_on_tiny_images(monkeypatch, height, width, level):
    """Forced parallel with one row per piece where possible: every split point and level round-trips."""
    monkeypatch.setattr(image_io, "PNG_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(image_io, "PNG_WORKERS", 8)
    monkeypatch.setattr(image_io, "_PNG_MIN_PIECE_BYTES", 1)
    pixels = noise(height, width, seed=height * 100 + width)
    assert check_png(encode_png(pixels, level), pixels) == min(8, height)


def test_parallel_and_single_paths_give_the_same_pixels_and_nearly_the_same_size(monkeypatch):
    pixels = np.concatenate([smooth(300, 640), noise(300, 640)])  # pieces of unequal cost
    parallel = encode_png(pixels)
    monkeypatch.setattr(image_io, "PNG_PARALLEL_MIN_BYTES", 1 << 62)
    single = encode_png(pixels)
    assert check_png(parallel, pixels) > 1 and check_png(single, pixels) == 1
    assert abs(len(parallel) - len(single)) < 0.005 * len(single)  # each piece is primed with the 32 KiB before it


def test_concurrent_callers_share_the_pool():
    images = [noise(200 + i, 300 + 7 * i, seed=i) for i in range(6)]
    with ThreadPoolExecutor(4) as callers:
        encoded = list(callers.map(encode_png, images))
    for data, pixels in zip(encoded, images):
        check_png(data, pixels)


def test_zlib_header_and_adler32_combine_match_zlib():
    for level in range(-1, 10):
        assert image_io._zlib_header(level) == zlib.compress(b"x", level)[:2]
    data = np.random.default_rng(1).integers(0, 256, 200_000, dtype=np.uint8).tobytes() + b"\xff" * 100_000
    for cut in [0, 1, 5552, 65521, 100_000, len(data)]:
        a, b = data[:cut], data[cut:]
        assert image_io._adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(data)


def test_smooth_images_compress():
    pixels = smooth(256, 256)
    pixels[..., 2] = (np.arange(256)[:, None] + np.arange(256)[None, :]) // 2
    assert len(encode_png(pixels)) < pixels.nbytes / 10


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG\r\n\x1a\n"), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_every_output_format_decodes(fmt, magic):
    pixels = torch.randint(0, 256, (64, 96, 3), dtype=torch.uint8)
    data = encode_output(pixels, fmt, compression=20)
    assert data.startswith(magic)
    assert Image.open(io.BytesIO(data)).size == (96, 64)


def test_json_with_base64_images_is_the_json_encoders_text():
    """Splicing the base64 in gives exactly what json.dumps of the whole payload gives, even when
    other fields contain quotes, non-ASCII text or what looks like a marker."""
    import base64
    import json

    from serve_app.image_io import json_with_base64_images

    images = [bytes(range(256)) * 3, b"", b"\x89PNG"]
    payload = {"created": 1, "data": [{"b64_json": None, "revised_prompt": p, "seed": i}
                                      for i, p in enumerate(['a "quoted" ü prompt', "-0", "\u2603"])],
               "model": "m"}
    expected = dict(payload, data=[dict(item, b64_json=base64.b64encode(img).decode()) for item, img
                                   in zip(payload["data"], images)])
    body = json_with_base64_images(payload, images)
    assert json.loads(body) == expected
    assert body == json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode()


@pytest.mark.parametrize("compression", [None, 70, 0, 99])
def test_jpeg_output_is_byte_for_byte_what_pillow_writes(compression):
    """JPEG goes through imagecodecs for speed; it must write exactly Pillow's bytes at the same quality."""
    # as the VaeDecoder returns them: a channels-first tensor permuted to [H, W, 3], not contiguous
    pixels = torch.from_numpy(np.random.default_rng(3).integers(0, 255, (3, 320, 480), dtype=np.uint8)).permute(1, 2, 0)
    quality = 90 if compression is None else max(1, 100 - compression)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="JPEG", quality=quality)
    assert encode_output(pixels, "jpeg", compression) == buffer.getvalue()


@pytest.mark.parametrize("cap,stated", [(20 << 20, "20 MiB (20971520 bytes)"), (3000, "3000 bytes")])
def test_an_upload_over_its_cap_states_the_limit_and_no_size_it_did_not_measure(cap, stated):
    """The body is read to the cap and one byte more, so the bytes in hand are not the upload's size."""
    read = b"\x89PNG" + b"0" * (cap - 3)  # what a 25 MB upload leaves after read(cap + 1)
    with pytest.raises(image_io.ApiError) as error:
        image_io.decode_upload(read, cap, 1 << 24, param="image")
    assert error.value.status == 413 and error.value.param == "image"
    assert str(error.value) == f"The uploaded image is over the limit of {stated}."
