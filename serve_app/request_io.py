"""Reading an HTTP request's body within its caps: a JSON object, or an edit's multipart form.

Every problem is an `ApiError` with its status (413 over a cap, 415 a wrong Content-Type, 400 a body
that does not parse), raised before anything is decoded past the cap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from serve_app.errors import ApiError, bad_request
from serve_app.loras import form_loras


def require_content_type(request: Request, expected: str) -> None:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != expected:
        raise ApiError(415, f"Content-Type must be {expected}, got {content_type or 'none'}.",
                       code="unsupported_media_type")


def check_declared_length(request: Request, cap: int) -> None:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, f"The request body is {declared} bytes, over the limit of {cap}.", code="request_too_large")


async def read_body(request: Request, cap: int) -> bytes:
    check_declared_length(request, cap)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise ApiError(413, f"The request body is over the limit of {cap} bytes.", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: Request, cap: int, field_caps: dict[str, int] | None = None) -> dict[str, Any]:
    """The body as a JSON object; deep nesting and integers past Python's digit limit are 400s too.

    `field_caps` raises the cap for named string fields (a base64 image) by their own caps: each is
    checked on its own, and the rest of the body still has to fit `cap`."""
    require_content_type(request, "application/json")
    field_caps = field_caps or {}
    body = await read_body(request, cap + sum(field_caps.values()))
    try:
        data = json.loads(body)
    except RecursionError:
        raise bad_request("The request body nests too deeply.", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit
        raise bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    rest = len(body)
    for name, field_cap in field_caps.items():
        value = data.get(name)
        if isinstance(value, str):
            if len(value) > field_cap:
                raise ApiError(413, f"{name} is {len(value)} characters, over its limit of {field_cap}.", param=name,
                               code="request_too_large")
            rest -= len(value)
    if rest > cap:
        raise ApiError(413, f"The request body is over the limit of {cap} bytes.", code="request_too_large")
    return data


@dataclass(frozen=True)
class EditForm:
    fields: dict
    image: bytes
    mask: bytes | None  # inpainting (serve_app.masks)
    control_image: bytes | str | None = None  # the ControlNet's: a file, or base64 text (serve_app.control)


async def read_edit_form(request: Request, max_field_bytes: int, max_upload_bytes: int) -> EditForm:
    """The text fields, the image file's bytes and the optional mask and control image files' bytes of an
    edit's multipart body."""
    require_content_type(request, "multipart/form-data")
    check_declared_length(request, 3 * max_upload_bytes + max_field_bytes)  # the image, its mask, a control image
    try:
        form = await request.form(max_files=4, max_fields=64, max_part_size=max_field_bytes)
    except ApiError:
        raise
    except Exception as exc:
        raise bad_request(f"The multipart body could not be parsed: {exc}", code="invalid_multipart") from None
    try:
        fields: dict = {}
        images, masks, loras, controls = [], [], [], []
        for key, value in form.multi_items():
            if key in ("image", "image[]"):
                images.append(value)
            elif key.startswith("loras") and not hasattr(value, "read"):
                loras.append((key, value))
            elif key == "mask":
                masks.append(value)
            elif key == "control_image":
                controls.append(value)
            elif hasattr(value, "read"):
                raise bad_request(f"Unexpected file field '{key}'.", param=key, code="unknown_parameter")
            else:
                fields[key] = value
        if not images:
            raise ApiError(400, "Missing required parameter: 'image'.", param="image",
                           code="missing_required_parameter")
        if len(images) > 1 or not hasattr(images[0], "read"):
            raise bad_request("Send exactly one image file.", param="image", code="invalid_image")
        if len(masks) > 1 or (masks and not hasattr(masks[0], "read")):
            raise bad_request("Send the mask as one image file.", param="mask", code="invalid_mask")
        if loras:
            fields["loras"] = form_loras(loras)
        if len(controls) > 1:
            raise bad_request("Send one control image.", param="control_image", code="invalid_image")
        mask = await masks[0].read(max_upload_bytes + 1) if masks else None
        control = controls[0] if controls else None  # base64 text as a field (the openai client's extra_body)
        if hasattr(control, "read"):
            control = await control.read(max_upload_bytes + 1)
        return EditForm(fields, await images[0].read(max_upload_bytes + 1), mask, control)
    finally:
        await form.close()
