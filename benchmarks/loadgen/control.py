"""The control image a share of the requests carry (`--control-fraction`), for a server with a ControlNet.

By default a photo-like 1024x1024 JPEG made here, deterministically: flat shapes over a gradient with
a little noise, so that its edge map (`control_preprocess: canny`, the default) has edges along the
shapes and few elsewhere, and its size on the wire (about 100-200 KB) is a camera photo's, not a
flat PNG's. `--control-image PATH` sends a file instead. The image is base64 in the JSON body, as
the server's `control_image` field takes it (README, ControlNet).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = [((96, 160, 480, 560), (214, 182, 54)), ((560, 120, 930, 430), (226, 232, 240)),
          ((400, 600, 900, 940), (168, 52, 40))]


def default_control_image(side: int = 1024) -> bytes:
    """A JPEG of flat shapes over a gradient with mild noise (the same bytes on every call)."""
    image = Image.linear_gradient("L").resize((side, side)).convert("RGB")
    draw = ImageDraw.Draw(image)
    scale = side / 1024
    for box, colour in SHAPES:
        draw.rectangle(tuple(round(v * scale) for v in box), fill=colour)
    noise = np.random.default_rng(0).normal(0, 3, (side, side, 3))
    pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def load_control_image(path: str | Path | None) -> bytes:
    """The file's bytes (checked to be a PNG, JPEG or WebP image), or the default image."""
    if path is None:
        return default_control_image()
    data = Path(path).read_bytes()
    try:
        kind = Image.open(io.BytesIO(data)).format
    except OSError:
        kind = None
    if kind not in ("PNG", "JPEG", "WEBP"):
        raise ValueError(f"control image {path} is not a PNG, JPEG or WebP image")
    return data


def encoded(image: bytes) -> str:
    return base64.b64encode(image).decode("ascii")
