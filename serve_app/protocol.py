"""Request, response and error models: OpenAI's images API plus Z-Image's own controls, and the
typed request/result of the Python handle API. In the order of OpenAI's docs: generations, edits,
the image object, the response, then errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from deployments.geometry import parse_size

MAX_PROMPT_CHARS = 32000
MAX_SEED = 2**63 - 1024  # image i of a request uses seed + i

OutputFormat = Literal["png", "jpeg", "webp"]


class LoraSpec(BaseModel):
    """One LoRA adapter for a request: the operator's name for it (`GET /v1/loras`) and its scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., min_length=1, max_length=64)
    scale: float = Field(1.0, ge=-2.0, le=2.0)


def used_loras():
    """A response's `loras`: the adapters an image was made with, left out of the JSON when none were
    used, so that strict OpenAI clients see no unknown field set to null."""
    return Field(None, exclude_if=lambda value: not value)


class ImageOptions(BaseModel):
    """Fields shared by generations and edits (OpenAI's, then Z-Image extensions)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int | None = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    output_format: OutputFormat | None = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = None
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["auto", "low"] | None = None
    user: str | None = Field(None, max_length=256)
    stream: bool | None = None
    partial_images: int | None = Field(None, ge=0, le=3)
    # Z-Image extensions
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float = Field(0.0, ge=0.0, le=20.0)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    style: str | None = Field(None, max_length=64)
    loras: list[LoraSpec] | None = Field(None, max_length=16)
    """LoRA adapters with their scales (at most `api.max_loras_per_request`); an extension field, which
    the official client sends in `extra_body`."""
    stream_progress: bool | None = None
    """With `stream: true`, also send a `zimage.progress` event after every denoising step; without
    it a stream carries exactly OpenAI's event types, so typed clients need not know ours."""
    # ControlNet (serve_app.control): the control image itself travels per endpoint
    control_scale: float | None = Field(None, ge=0.0, le=2.0)
    control_preprocess: Literal["canny"] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain text")
        return value

    @field_validator("stream_progress")
    @classmethod
    def _progress_needs_a_stream(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value and not info.data.get("stream"):
            raise ValueError("stream_progress needs stream: true")
        return value

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        parse_size(value)  # the shape only; the server's limits are checked when the request is planned
        return value


class ImageGenerationRequest(ImageOptions):
    """`POST /v1/images/generations` (JSON). `control_image`: base64 (or a data URL) of a PNG, JPEG or
    WebP, for the ControlNet (serve_app.control)."""

    control_image: str | None = None


class ImageEditRequest(ImageOptions):
    """`POST /v1/images/edits` (multipart); the `image` file, and the optional `mask` and
    `control_image` files, travel beside these fields. `strength` defaults to 0.6, or to 1.0 with a
    mask (as diffusers' inpainting); an edit with a control image needs a mask and takes no strength.

    `keep_unmasked` (a Z-Image extension; only with a mask): true (default), the output outside the
    mask is the upload's own pixels, blended with the repainted area over a feathered band at the
    mask's edge (deployments.inpaint_mask); false, every pixel is the model's decode, which outside the
    mask is the VAE's round trip of the upload (what diffusers' `ZImageInpaintPipeline` returns;
    OpenAI's newer image models likewise give back a wholly regenerated image)."""

    strength: float | None = Field(None, ge=0.1, le=1.0)
    keep_unmasked: bool = True


class ImageObject(BaseModel):
    """One image: `b64_json`, or with `response_format: "url"` a `url` that expires (serve_app.image_store)."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str
    seed: int
    loras: list[LoraSpec] | None = used_loras()


class Timings(BaseModel):
    """Milliseconds: the whole request, and the model stages summed over its images.

    Each stage's `X_ms` is its whole time in that stage; `X_queue_ms` is the part of it spent waiting
    before its batch started (the Denoiser: before its first step), so `X_ms - X_queue_ms` is model time.
    """

    total_ms: float
    style_ms: float
    encode_ms: float
    encode_queue_ms: float = 0.0
    image_encode_ms: float = 0.0
    image_encode_queue_ms: float = 0.0
    denoise_ms: float
    denoise_queue_ms: float = 0.0
    decode_ms: float
    decode_queue_ms: float = 0.0
    output_encode_ms: float


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageObject]
    model: str
    size: str
    output_format: OutputFormat
    timings: Timings
    random_weights: bool = False
    speed: dict[str, str] = Field(default_factory=dict)
    """What ran in each stage for this request's first image, e.g. `{"denoiser": "fp8 fused, compiled,
    CUDA graphs on NVIDIA H200 (sm90)"}`: FP8 and bf16 give different pixels for one seed."""


# ---- streaming (`stream: true`): server-sent events, fields as the openai client's event types ----


class StreamUsage(BaseModel):
    """Counted in DiT tokens (a 16x16 pixel patch each; the caption's tokens for text)."""

    class InputDetails(BaseModel):
        image_tokens: int
        text_tokens: int

    input_tokens: int
    input_tokens_details: InputDetails
    output_tokens: int
    total_tokens: int


class ImageStreamEvent(BaseModel):
    """What every image event carries: the request's settings (`size` is the requested image's, also
    on a partial image, which is smaller: see `VaeCodec.preview`). The image is `b64_json`; only a
    completed event of a `response_format: "url"` request carries `url` instead."""

    b64_json: str | None = None
    url: str | None = None
    created_at: int
    size: str
    quality: Literal["low", "medium", "high", "auto"]
    background: Literal["opaque", "auto"]
    output_format: OutputFormat


class ImagePartialEvent(ImageStreamEvent):
    """`image_generation.partial_image` / `image_edit.partial_image`."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    partial_image_index: int


class ImageCompletedEvent(ImageStreamEvent):
    """`image_generation.completed` / `image_edit.completed`; `seed`, `revised_prompt` and `timings` are
    Z-Image extensions."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    usage: StreamUsage
    seed: int
    revised_prompt: str
    timings: Timings
    random_weights: bool = False
    loras: list[LoraSpec] | None = used_loras()
    speed: dict[str, str] = Field(default_factory=dict)


class ProgressEvent(BaseModel):
    """`zimage.progress`, a Z-Image extension after every denoising step; OpenAI clients may ignore it."""

    type: Literal["zimage.progress"] = "zimage.progress"
    step: int
    steps: int
    elapsed: float  # seconds since the request arrived


class UsageLimits(BaseModel):
    """A key's limits on the Ingress replica that answered (its share of each; None: no limit)."""

    max_in_flight: int | None
    images_per_minute: int | None
    weight: float


class KeyUsage(BaseModel):
    """`GET /v1/usage`: the caller's own key, as the Ingress replica that answered counts it."""

    object: Literal["usage"] = "usage"
    key: str
    """The key's name (`unnamed`, `anonymous` for keys without one, or with keys off)."""
    ingress_replicas: int
    """The Ingress replicas sharing the key's limits; each counts only what it admitted itself."""
    limits: UsageLimits
    in_flight: int
    """Requests of the key admitted here and not finished, `waiting` of them not yet released."""
    waiting: int
    images_last_minute: int
    images_remaining: int | None
    refused: dict[str, int]
    """Refusals here since the replica started: in_flight and images_per_minute (429), capacity (503)."""


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    request_id: str | None = None
    """Serve's request ID (the client's X-Request-ID when sent): the key to the request's log lines."""


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamErrorEvent(ErrorResponse):
    """A failure after a stream has started: the last event before the server closes the stream."""

    type: Literal["error"] = "error"


# ---- the Python handle API -------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRequest:
    """What another Ray application passes to `handle.generate.remote(...)`.

    `init_image` (encoded PNG/JPEG/WebP bytes) turns the request into an edit with `strength`;
    `mask` (bytes of an image of the same size: fully transparent, or without alpha white = edit)
    makes it an inpainting edit. `strength` None: 0.6, or 1.0 with a mask. `keep_unmasked`: as the
    edits route's field (`ImageEditRequest`).
    """

    prompt: str
    n: int = 1
    width: int | None = None  # None: 1024, or for an edit the upload's fitted size
    height: int | None = None
    steps: int | None = None
    seed: int | None = None
    style: str | None = None
    guidance_scale: float = 0.0
    negative_prompt: str | None = None
    output_format: OutputFormat = "png"
    output_compression: int | None = None
    init_image: bytes | None = None
    strength: float | None = None
    mask: bytes | None = None
    keep_unmasked: bool = True  # with a mask: the upload's own pixels outside it
    loras: tuple[LoraSpec | dict, ...] = ()  # LoraSpec(name=..., scale=...) or {"name": ..., "scale": ...}
    response_format: Literal["b64_json", "url"] = "b64_json"  # url: each image stored, GeneratedImage.url set
    control_image: bytes | None = None  # ControlNet (serve_app.control); with init_image it needs a mask
    control_scale: float | None = None  # None: 0.75
    control_preprocess: Literal["canny"] | None = None
    timeout_s: float | None = None  # this request's deadline in seconds, capped by the server's api.request_timeout_s
    tenant: str | None = None
    """The name of the key whose limits and share of the GPU this request takes (None: `anonymous`).
    A handle call carries no key, so its tenant is trusted as declared; a name no key has is a 400."""


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes  # encoded in `format`; empty when the image went to the image store (`url`)
    format: OutputFormat
    seed: int
    width: int
    height: int
    revised_prompt: str
    loras: tuple[LoraSpec, ...] = ()  # the adapters this image was made with
    url: str | None = None  # response_format "url": where the image is, until it expires


@dataclass(frozen=True)
class ImageResult:
    images: list[GeneratedImage]
    timings: Timings
    random_weights: bool = False
    prompt_truncated: bool = False
    prompt_tokens: int = 0  # known on the streamed path only
    speed: dict[str, str] = field(default_factory=dict)  # what ran, by stage (`ImagesResponse.speed`)


@dataclass(frozen=True)
class StepDone:
    """A streamed run: one more denoising step done."""

    step: int
    steps: int
    elapsed_s: float


@dataclass(frozen=True)
class PartialImage:
    """A streamed run: a preview, encoded in the request's output format."""

    index: int
    data: bytes
    width: int
    height: int
