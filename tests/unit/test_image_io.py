"""Output encoding: our PNG writer round-trips exactly; lossy formats carry their magic bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.image_io import encode_output, encode_png


@pytest.mark.parametrize("shape", [(512, 512, 3), (48, 80, 3), (1, 16, 3)])
def test_png_round_trips_exactly(shape):
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_png(pixels)))
    assert decoded.format == "PNG" and decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), pixels)


def test_smooth_images_compress():
    y, x = np.mgrid[0:256, 0:256]
    smooth = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    assert len(encode_png(smooth)) < smooth.nbytes / 10


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG\r\n\x1a\n"), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_every_output_format_decodes(fmt, magic):
    pixels = torch.randint(0, 256, (64, 96, 3), dtype=torch.uint8)
    data = encode_output(pixels, fmt, compression=20)
    assert data.startswith(magic)
    assert Image.open(io.BytesIO(data)).size == (96, 64)
