"""Each entry point's request turned into a `RequestPlan`: a JSON generation, a multipart edit, and
the Python handle API's `ImageRequest`. Parsing and decoding problems are 4xx `ApiError`s.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError
from starlette.requests import Request

from serve_app import request_io
from serve_app.config import ApiLimits
from serve_app.control import ControlNetInfo, base64_cap, control_from_request
from serve_app.errors import bad_request, from_validation_error
from serve_app.image_io import decode_upload
from serve_app.masks import decode_mask
from serve_app.pipeline import RequestPlan, plan_request
from serve_app.protocol import ImageEditRequest, ImageGenerationRequest, ImageOptions, ImageRequest
from serve_app.streaming import StreamKind

NO_CONTROLNET = ControlNetInfo(None)


@dataclass(frozen=True)
class PlannedRequest:
    """What the route asked (its options: streaming, response format) and the plan to run."""

    options: ImageOptions
    plan: RequestPlan
    kind: StreamKind


async def plan_generation(request: Request, limits: ApiLimits, model_name: str,
                          controlnet: ControlNetInfo = NO_CONTROLNET) -> PlannedRequest:
    """POST /v1/images/generations: a JSON body (its cap raised for a base64 `control_image`, when the
    server has a ControlNet: serve_app.control)."""
    data = await request_io.read_json_object(request, limits.max_body_bytes, field_caps={
        "control_image": base64_cap(limits.max_upload_bytes)} if controlnet.loaded else None)
    options = ImageGenerationRequest.model_validate(data)
    control = control_from_request(data, options.control_image, limits.max_upload_bytes, limits.max_upload_pixels,
                                   controlnet.loaded)
    return PlannedRequest(options, plan_request(options, None, limits, model_name, control=control),
                          "image_generation")


async def plan_edit(request: Request, limits: ApiLimits, model_name: str,
                    controlnet: ControlNetInfo = NO_CONTROLNET) -> PlannedRequest:
    """POST /v1/images/edits: a multipart body with the image (and optionally a mask and a control
    image) as files. A control image needs a ControlNet that inpaints (serve_app.control)."""
    form = await request_io.read_edit_form(request, limits.max_body_bytes, limits.max_upload_bytes)
    options = ImageEditRequest.model_validate(form.fields)
    init = decode_upload(form.image, limits.max_upload_bytes, limits.max_upload_pixels)
    mask = None if form.mask is None else decode_mask(form.mask, init.size, limits.max_upload_bytes,
                                                      limits.max_upload_pixels)
    control = control_from_request(form.fields, form.control_image, limits.max_upload_bytes, limits.max_upload_pixels,
                                   controlnet.loaded)
    if control is not None:
        await controlnet.check_inpaints()
    return PlannedRequest(options, plan_request(options, init, limits, model_name, mask, control), "image_edit")


async def plan_handle_request(request: ImageRequest, limits: ApiLimits, model_name: str,
                              controlnet: ControlNetInfo = NO_CONTROLNET) -> RequestPlan:
    """The handle API's `ImageRequest` through the same validation as the HTTP routes' fields."""
    init = mask = None
    if request.init_image is not None:
        init = decode_upload(request.init_image, limits.max_upload_bytes, limits.max_upload_pixels)
    if request.mask is not None:
        if init is None:
            raise bad_request("A mask needs init_image, the image to edit.", param="mask", code="invalid_mask")
        mask = decode_mask(request.mask, init.size, limits.max_upload_bytes, limits.max_upload_pixels)
    options = ImageEditRequest if init is not None else ImageGenerationRequest
    size = f"{request.width}x{request.height}" if request.width and request.height else None
    fields = dict(
        prompt=request.prompt, n=request.n, size=size, seed=request.seed, num_inference_steps=request.steps,
        style=request.style, guidance_scale=request.guidance_scale, negative_prompt=request.negative_prompt,
        output_format=request.output_format, output_compression=request.output_compression,
        response_format=request.response_format,
        control_scale=request.control_scale, control_preprocess=request.control_preprocess,
    )
    control = control_from_request(fields, request.control_image, limits.max_upload_bytes, limits.max_upload_pixels,
                                   controlnet.loaded)
    if init is not None and control is not None:
        await controlnet.check_inpaints()
    if init is not None:
        fields["strength"] = request.strength
        fields["keep_unmasked"] = request.keep_unmasked
    if request.loras:
        fields["loras"] = [lora if isinstance(lora, dict) else lora.model_dump() for lora in request.loras]
    try:
        parsed = options.model_validate(fields)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    return plan_request(parsed, init, limits, model_name, mask, control)
