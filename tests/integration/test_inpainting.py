"""Inpainting through the served app: the official client's `images.edit(image=..., mask=...)` against
diffusers' `ZImageInpaintPipeline` on the same tiny checkpoint, `n`, streaming, the handle API, and bad
masks over real HTTP."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import torch
from PIL import Image, ImageFilter

from deployments.inpaint_mask import OVERLAY_BAND_PX, OVERLAY_BLUR_PX
from serve_app.protocol import ImageRequest
from tests.diffusers_reference import quiet
from tests.integration.conftest import APP_NAME, decode_png, off_loop

pytestmark = pytest.mark.integration

EDIT = "/v1/images/edits"
SEED, STEPS = 11, 3


@pytest.fixture()
def client(served):
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 255
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def alpha_mask(width: int, height: int, box: tuple[int, int, int, int] | None) -> Image.Image:
    """OpenAI's mask: opaque everywhere but `box` = (left, top, right, bottom), fully transparent."""
    alpha = np.full((height, width), 255, np.uint8)
    if box is not None:
        left, top, right, bottom = box
        alpha[top:bottom, left:right] = 0
    return Image.fromarray(np.dstack([np.full((height, width, 3), 40, np.uint8), alpha]), "RGBA")


def as_white_is_edit(mask: Image.Image) -> Image.Image:
    """The same mask in diffusers' convention (greyscale, white = edit)."""
    return Image.fromarray(np.where(np.asarray(mask.getchannel("A")) == 0, 255, 0).astype(np.uint8), "L")


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_png(b64).convert("RGB")).astype(np.int16)


IMAGE, MASK = photo(512, 512, 3), alpha_mask(512, 512, (96, 128, 416, 352))


def test_the_official_client_inpaints_as_diffusers_does(client, diffusers_t2i):
    """`keep_unmasked: false` gives `ZImageInpaintPipeline`'s image; the default gives that image with the
    upload pasted back through diffusers' `blur` and `apply_overlay`: the upload itself past the band."""
    from diffusers import ZImageInpaintPipeline
    from diffusers.image_processor import VaeImageProcessor

    files = {"image": ("in.png", png(IMAGE), "image/png"), "mask": ("mask.png", png(MASK), "image/png")}
    asked = {"seed": SEED, "num_inference_steps": STEPS}
    kept = pixels(client.images.edit(**files, prompt="a red boat on a lake", extra_body=asked).data[0].b64_json)
    plain = client.images.edit(**files, prompt="a red boat on a lake", extra_body={**asked, "keep_unmasked": False})
    reference = quiet(ZImageInpaintPipeline(**diffusers_t2i.components))
    expected = reference("a red boat on a lake", image=IMAGE, mask_image=as_white_is_edit(MASK), width=512, height=512,
                         num_inference_steps=STEPS, guidance_scale=0.0,  # strength: diffusers' default, 1.0
                         generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    assert np.abs(pixels(plain.data[0].b64_json) - np.asarray(expected).astype(np.int16)).max() <= 1
    processor = VaeImageProcessor()
    pasted = processor.apply_overlay(processor.blur(as_white_is_edit(MASK), OVERLAY_BLUR_PX), IMAGE, expected)
    assert np.abs(kept - np.asarray(pasted).astype(np.int16)).max() <= 1
    outside = far_outside(MASK, OVERLAY_BAND_PX)
    assert np.array_equal(kept[outside], np.asarray(IMAGE).astype(np.int16)[outside])


def far_outside(mask: Image.Image, band: int) -> np.ndarray:
    """The pixels farther than `band` from the mask's area (a square's reach, as PIL's separable blur)."""
    grown = as_white_is_edit(mask).filter(ImageFilter.MaxFilter(2 * band + 1))
    return np.asarray(grown) == 0


def test_n_images_and_a_stream_each_inpaint_their_seed(client):
    files = {"image": ("in.png", png(IMAGE), "image/png"), "mask": ("mask.png", png(MASK), "image/png")}
    two = client.images.edit(**files, prompt="a lighthouse", n=2, extra_body={"seed": SEED, "num_inference_steps": 2})
    assert [d.model_extra["seed"] for d in two.data] == [SEED, SEED + 1]
    stream = client.images.edit(**files, prompt="a lighthouse", stream=True, partial_images=1,
                                extra_body={"seed": SEED + 1, "num_inference_steps": 2})
    events = list(stream)
    assert [e.type for e in events if e.type.startswith("image_edit")] == ["image_edit.partial_image",
                                                                           "image_edit.completed"]
    assert np.array_equal(pixels(events[-1].b64_json), pixels(two.data[1].b64_json))
    assert np.abs(pixels(two.data[0].b64_json) - pixels(two.data[1].b64_json)).max() > 10
    # the preview (half the image's side) has the upload pasted back too, at its own scale
    preview = pixels(events[0].b64_json)
    half = (IMAGE.width // 2, IMAGE.height // 2)
    outside = far_outside(MASK.resize(half, Image.Resampling.NEAREST), OVERLAY_BAND_PX // 2 + 1)
    scaled_upload = np.asarray(IMAGE.resize(half, Image.Resampling.BOX)).astype(np.int16)
    assert preview.shape[:2] == outside.shape and outside.mean() > 0.3
    assert np.array_equal(preview[outside], scaled_upload[outside])


def test_the_handle_api_takes_a_mask(served, client):
    from ray import serve

    request = ImageRequest(prompt="a lighthouse", init_image=png(IMAGE), mask=png(MASK), steps=2, seed=SEED)
    result = off_loop(lambda: serve.get_app_handle(APP_NAME).generate.remote(request).result(timeout_s=120))
    over_http = client.images.edit(image=("in.png", png(IMAGE), "image/png"), mask=("m.png", png(MASK), "image/png"),
                                   prompt="a lighthouse", extra_body={"seed": SEED, "num_inference_steps": 2})
    assert result.images[0].data == base64.b64decode(over_http.data[0].b64_json)


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_MASKS = [
    (png(alpha_mask(512, 384, (0, 0, 128, 128))), 400, "image's size"),
    (png(alpha_mask(640, 640, (0, 0, 128, 128))), 400, "image's size"),
    (png(alpha_mask(512, 512, None)), 400, "nothing to edit"),
    (b"not an image at all", 400, "could not be decoded"),
    (png(alpha_mask(512, 512, (0, 0, 64, 64)))[:120], 400, "truncated or corrupt"),
    (bomb(), 400, "limit of"),
    (b"\x89PNG" + b"0" * (2 << 20), 413, "over the limit"),
]


@pytest.mark.parametrize("mask,status,message", BAD_MASKS,
                         ids=["aspect", "size", "opaque", "text", "truncated", "bomb", "bytes"])
def test_bad_masks_get_an_error_naming_mask(http, mask, status, message):
    response = http.post(EDIT, data={"prompt": "x", "num_inference_steps": "1"},
                         files={"image": ("in.png", png(IMAGE), "image/png"), "mask": ("m.png", mask, "image/png")})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == "mask" and message in error["message"] and error["type"]


def test_two_masks_are_refused(http):
    mask = ("m.png", png(MASK), "image/png")
    response = http.post(EDIT, data={"prompt": "x"}, files=[("image", ("in.png", png(IMAGE), "image/png")),
                                                            ("mask", mask), ("mask", mask)])
    assert response.status_code == 400 and response.json()["error"]["param"] == "mask"
