"""A request's control image for the ControlNet: how it travels, what is checked, how it is prepared.

How it travels, in the OpenAI style:
- `POST /v1/images/generations` (JSON): `control_image` is the image's bytes in base64 (or a
  `data:image/...;base64,` URL). The JSON body cap (`api.max_body_bytes`, 1 MiB) is raised for this
  one field by the upload cap's base64 size: the rest of the body still has to fit the 1 MiB
  (`request_io.read_json_object`'s `field_caps`);
- `POST /v1/images/edits` (multipart): a third file, `control_image`, beside `image` and `mask`, or
  a text field of the same name holding base64 (what the official client's `extra_body` sends; a
  text field is bounded by the body cap, a file by the upload cap);
- the handle API: `ImageRequest.control_image` (bytes).
`control_scale` (default 0.75, diffusers' `controlnet_conditioning_scale`) and `control_preprocess`
(`"canny"`: OpenCV's Canny edge detector on the server, so a user can send a plain photo) ride along.

The control image is checked as an upload is (format, bytes, pixels before decoding), fitted to the
generation size as an upload is (`fit_upload`: centre-crop to the aspect, then resize, where diffusers'
pipelines stretch; a tiny image is scaled up), then preprocessed. Without `size`, a generation takes
the control image's fitted size, as diffusers' ControlNet pipeline takes the control image's.

An edit with a control image is `ZImageControlNetInpaintPipeline`: it needs a mask (the ControlNet
inpaints; there is no reference for control over a whole upload, so that is a 400), and has no strength.
It also needs a ControlNet that takes a mask (Union 2.x, 33 control channels): one without mask
channels (Union 1.0, 16) cannot inpaint, so its edits with a control image are a 400 too
(`ControlNetInfo` asks the Denoiser once what it loaded).
Every problem is a 400 in OpenAI's error shape naming the field.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from deployments.contracts import MaskedUpload
from deployments.geometry import fit_upload
from serve_app.errors import ApiError, bad_request
from serve_app.image_io import decode_upload

logger = logging.getLogger("ray.serve")

ControlPreprocess = Literal["canny"]
CONTROL_FIELDS = ("control_image", "control_scale", "control_preprocess")
CANNY_THRESHOLDS = (100, 200)  # OpenCV's usual pair, as the ControlNet model cards' canny examples


def base64_cap(max_bytes: int) -> int:
    """Characters of the base64 text of `max_bytes` bytes, with room for a data URL's prefix."""
    return 4 * ((max_bytes + 2) // 3) + 64


def decode_base64_image(text: str, max_bytes: int) -> bytes:
    """`control_image` of a JSON body: base64, or a data URL holding base64."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise bad_request("control_image must be base64 (or a data URL with ';base64').", param="control_image",
                              code="invalid_image")
    if len(text) > base64_cap(max_bytes):
        raise ApiError(413, f"control_image is over the upload limit of {max_bytes} bytes.", param="control_image",
                       code="image_too_large")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("control_image is not valid base64.", param="control_image", code="invalid_image") from None


def canny(image: Image.Image, thresholds: tuple[int, int] = CANNY_THRESHOLDS) -> Image.Image:
    """White edges on black, as RGB: OpenCV's Canny on the greyscale image."""
    try:
        import cv2
    except ImportError:
        raise bad_request("control_preprocess 'canny' needs OpenCV on the server (the [control] extra).",
                          param="control_preprocess", code="unsupported_value") from None

    edges = cv2.Canny(np.asarray(image.convert("L")), *thresholds)
    return Image.fromarray(edges).convert("RGB")


def check_control_fields(asked: dict, controlnet_loaded: bool) -> None:
    """Control fields without a ControlNet, or scale/preprocess without an image: a 400 naming the field."""
    present = [name for name in CONTROL_FIELDS if asked.get(name) is not None]
    if present and not controlnet_loaded:
        raise bad_request(f"{present[0]} needs a ControlNet, and this server has none loaded (the `controlnet` "
                          "setting).", param=present[0], code="controlnet_not_loaded")
    if asked.get("control_image") is None:
        for name in CONTROL_FIELDS[1:]:
            if asked.get(name) is not None:
                raise bad_request(f"{name} needs a control_image.", param=name, code="missing_required_parameter")


class ControlNetInfo:
    """What the Ingress knows of the Denoiser's ControlNet: whether one is configured (the `controlnet`
    setting, known when the app is built) and whether it takes a mask (its control channels, read from
    the loaded model: a hub id or a single file says so only once loaded). `learn_in_background` asks
    the Denoiser once, from a thread, as soon as a replica can answer (the handle call waits for one to
    be ready), so the page's settings say it (`/page/settings`: the Transform tab offers control only
    with a ControlNet that inpaints); an edit with a control image that comes first asks and waits
    itself. The answer is kept: the setting cannot change under a running Ingress (both are built from
    the same args)."""

    def __init__(self, setting: str | None, denoiser=None):
        self.setting = setting
        self.denoiser = denoiser
        self._channels: int | None = None

    @property
    def loaded(self) -> bool:
        return self.setting is not None

    @property
    def channels(self) -> int | None:
        """The control channels once known (16: control only; 33, Union 2.x: also a mask), else None."""
        return self._channels

    @property
    def inpaints(self) -> bool | None:
        """Whether an edit may carry a control image (with its mask); None until the channels are known."""
        from deployments.denoiser.control import LATENT_CHANNELS  # torch: the replica's (replica_imports)

        return None if self._channels is None else self._channels > LATENT_CHANNELS

    def learn_in_background(self) -> None:
        if self.loaded and self.denoiser is not None:
            threading.Thread(target=self._learn, name="controlnet-channels", daemon=True).start()

    def _learn(self) -> None:
        wait_s = 1.0
        while self._channels is None:
            try:
                self._channels = int(self.denoiser.control_channels.remote().result())
            except Exception as exc:  # the Denoiser died or was replaced before it answered: ask again
                logger.info("asking the Denoiser for its ControlNet's channels again in %.0f s: %s", wait_s, exc)
                time.sleep(wait_s)
                wait_s = min(2 * wait_s, 30.0)

    async def control_channels(self) -> int:
        if self._channels is None:
            self._channels = int(await self.denoiser.control_channels.remote())
        return self._channels

    async def check_inpaints(self) -> None:
        """A 400 naming `control_image` when the loaded ControlNet has no mask channels."""
        from deployments.denoiser.control import LATENT_CHANNELS  # torch: the replica's (replica_imports)

        channels = await self.control_channels()
        if channels <= LATENT_CHANNELS:
            raise bad_request(f"This server's ControlNet ({channels} control channels, as Union 1.0) cannot "
                              "inpaint: it takes no mask, so an edit cannot use a control_image. Send "
                              "the edit without control_image, or the control image to /v1/images/generations; "
                              "inpainting with control needs a Union 2.x ControlNet (33 control channels).",
                              param="control_image", code="controlnet_cannot_inpaint")


@dataclass(frozen=True)
class ControlPlan:
    """A controlled request's prepared inputs for the VAE's `encode_control` and the Denoiser."""

    image: Image.Image  # RGB at the generation size, preprocessed
    scale: float
    masked: MaskedUpload | None = None  # an edit's upload with its mask (the ControlNet inpaints)


def control_from_request(asked: dict, data: bytes | str | None, max_bytes: int, max_pixels: int,
                         controlnet_loaded: bool) -> Image.Image | None:
    """The request's control image, decoded and checked (None without one): `asked` holds the request's
    fields as sent, `data` the control image's bytes (multipart, handle) or base64 text (JSON)."""
    check_control_fields({**asked, "control_image": data}, controlnet_loaded)
    if data is None:
        return None
    if isinstance(data, str):
        data = decode_base64_image(data, max_bytes)
    return decode_upload(data, max_bytes, max_pixels, param="control_image")


def plan_control(control: Image.Image, scale: float | None, preprocess: ControlPreprocess | None,
                 size: tuple[int, int], init: Image.Image | None = None, mask: Image.Image | None = None,
                 strength: float | None = None) -> ControlPlan:
    """The control image fitted (and preprocessed) at `size`; for an edit, the upload and its mask,
    both already fitted to `size` (serve_app.masks.plan_mask)."""
    from deployments.denoiser.control import DEFAULT_CONTROL_SCALE  # torch: the replica's (replica_imports)

    if init is not None and mask is None:
        raise bad_request("An edit with a control_image needs a mask: the ControlNet repaints the masked area "
                          "(ZImageControlNetInpaintPipeline). For control over a whole image, send it to "
                          "/v1/images/generations.", param="control_image", code="invalid_control")
    if init is not None and strength is not None:
        raise bad_request("strength does not apply to an edit with a control_image: the ControlNet repaints the "
                          "masked area from noise.", param="strength", code="unsupported_value")
    fitted = fit_upload(control, size)
    if preprocess == "canny":
        fitted = canny(fitted)
    masked = None
    if init is not None:
        masked = MaskedUpload(image=init, mask=mask)
    return ControlPlan(image=fitted, scale=DEFAULT_CONTROL_SCALE if scale is None else scale, masked=masked)


async def control_preview_response(request, limits, controlnet_loaded: bool):
    """POST /page/control-preview: `{"control_image": base64}` to the PNG of its edge map."""
    import asyncio

    from starlette.responses import Response

    from serve_app import request_io

    data = await request_io.read_json_object(request, limits.max_body_bytes,
                                             field_caps={"control_image": base64_cap(limits.max_upload_bytes)})
    check_control_fields({"control_image": data.get("control_image"), "control_preprocess": "canny"}, controlnet_loaded)
    png = await asyncio.to_thread(canny_preview_png, data, limits.max_upload_bytes, limits.max_upload_pixels)
    return Response(png, media_type="image/png")


def canny_preview_png(data: dict, max_bytes: int, max_pixels: int) -> bytes:
    """The page's canny preview: the edge map the server makes of `data["control_image"]` (base64), as a
    PNG at the image's size fitted as a generation from it would be."""
    from deployments.geometry import fitted_size
    from serve_app.image_io import encode_png

    text = data.get("control_image")
    if not isinstance(text, str):
        raise bad_request("Send control_image as base64.", param="control_image", code="missing_required_parameter")
    image = decode_upload(decode_base64_image(text, max_bytes), max_bytes, max_pixels, param="control_image")
    edges = canny(fit_upload(image, fitted_size(*image.size)))
    return encode_png(np.asarray(edges))
