"""The Ingress deployment: HTTP routes (OpenAI's images API) and the Python handle API.

It authenticates, parses and validates; the request's plan and its run through the stages are
`serve_app.pipeline`'s. Every failure leaves as one error shape.
"""

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from deployments.core.image_sizes import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, SIZE_PRESETS
from deployments.stage_base import deep_merge
from serve_app.config import ApiLimits
from serve_app.errors import ApiError, api_error_for, bad_request, error_response, from_validation_error
from serve_app.image_io import decode_upload, json_with_base64_images
from serve_app.pipeline import ImagePipeline, RequestPlan, plan_request
from serve_app.protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageObject,
    ImageOptions,
    ImageRequest,
    ImageResult,
    ImagesResponse,
)
from serve_app.streaming import SSE_HEADERS, StreamEvents, StreamItem, StreamKind, sse_body

logger = logging.getLogger("ray.serve")

PUBLIC_PATHS = ("/health/live", "/health/ready", "/docs", "/openapi.json")

WEB_DIR = Path(__file__).parent / "web"  # the page: static files, no build step, nothing from the network

app = FastAPI(
    title="zimage-serve",
    description="Z-Image-Turbo behind an OpenAI-compatible images API.",
    version="0.1.0",
)
app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    messages = {404: f"No route {request.url.path}.", 405: f"Method {request.method} is not allowed here."}
    return error_response(ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail))))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query")) or None
    return error_response(bad_request(f"Invalid value for '{param}': {first.get('msg', 'invalid')}", param=param))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return error_response(api_error_for(exc))


class IngressConfig(BaseModel):
    """The Ingress's live config: the API's limits and accepted key digests."""

    model_config = ConfigDict(extra="forbid")

    api: ApiLimits = Field(default_factory=ApiLimits)


def _json_schema_body(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _multipart_schema_body() -> dict:
    schema = ImageEditRequest.model_json_schema()
    schema["properties"]["image"] = {"type": "string", "format": "binary"}
    schema["required"] = ["image", "prompt"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512)
@serve.ingress(app)
class Ingress:
    config_model = IngressConfig

    def __init__(self, styler, text_encoder, denoiser, vae, model_name: str, random_weights: bool,
                 base_config: dict | None = None):
        self.styler = styler
        self.stages = [("PromptStyler", styler), ("TextEncoder", text_encoder), ("Denoiser", denoiser),
                       ("VaeDecoder", vae)]
        self.pipeline = ImagePipeline(styler, text_encoder, denoiser, vae, random_weights)
        self.base_config = dict(base_config or {})
        self.reconfigure({})
        self.model_name = model_name
        self.random_weights = random_weights
        self.inflight = 0
        if random_weights:
            logger.warning("serving model %r with RANDOM weights: images carry no meaning", model_name)

    def reconfigure(self, user_config: dict) -> None:
        """`user_config` over the bound `base_config` (see deployments.stage_base): an override of
        one limit keeps the others and the key digests that `args` gave."""
        config = IngressConfig.model_validate(deep_merge(self.base_config, user_config))
        self.limits = config.api.with_env_keys()

    # ---- the Python handle API -----------------------------------------------------------------

    async def generate(self, request: ImageRequest) -> ImageResult:
        """For other Ray applications: `await serve.get_app_handle(name).generate.remote(ImageRequest(...))`."""
        init = None
        if request.init_image is not None:
            init = decode_upload(request.init_image, self.limits.max_upload_bytes, self.limits.max_upload_pixels)
        options = ImageEditRequest if init is not None else ImageGenerationRequest
        size = f"{request.width}x{request.height}" if request.width and request.height else None
        fields = dict(
            prompt=request.prompt, n=request.n, size=size, seed=request.seed, num_inference_steps=request.steps,
            style=request.style, guidance_scale=request.guidance_scale, negative_prompt=request.negative_prompt,
            output_format=request.output_format, output_compression=request.output_compression,
        )
        if init is not None:
            fields["strength"] = request.strength
        try:
            parsed = options.model_validate(fields)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        return await self._admit_and_run(plan_request(parsed, init, self.limits, self.model_name))

    # ---- HTTP routes ---------------------------------------------------------------------------

    @app.post("/v1/images/generations", response_model=ImagesResponse, openapi_extra=_json_schema_body(ImageGenerationRequest))
    async def generations(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            self._require_content_type(request, "application/json")
            body = await self._read_body(request, self.limits.max_body_bytes)
            try:
                data = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise bad_request("The request body is not valid JSON.", code="invalid_json") from None
            if not isinstance(data, dict):
                raise bad_request("The request body must be a JSON object.", code="invalid_json")
            parsed = ImageGenerationRequest.model_validate(data)
            plan = plan_request(parsed, None, self.limits, self.model_name)
            if parsed.stream:
                return await self._stream(plan, parsed, "image_generation")
            result = await self._admit_and_run(plan)
            return await self._respond(result, parsed)
        except Exception as exc:
            return error_response(api_error_for(exc))

    @app.post("/v1/images/edits", response_model=ImagesResponse, openapi_extra=_multipart_schema_body())
    async def edits(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            self._require_content_type(request, "multipart/form-data")
            self._check_declared_length(request, self.limits.max_upload_bytes + self.limits.max_body_bytes)
            try:
                form = await request.form(max_files=2, max_fields=64, max_part_size=self.limits.max_body_bytes)
            except ApiError:
                raise
            except Exception as exc:
                raise bad_request(f"The multipart body could not be parsed: {exc}", code="invalid_multipart") from None
            try:
                fields, image_bytes = await self._split_form(form)
            finally:
                await form.close()
            parsed = ImageEditRequest.model_validate(fields)
            init = decode_upload(image_bytes, self.limits.max_upload_bytes, self.limits.max_upload_pixels)
            plan = plan_request(parsed, init, self.limits, self.model_name)
            if parsed.stream:
                return await self._stream(plan, parsed, "image_edit")
            result = await self._admit_and_run(plan)
            return await self._respond(result, parsed)
        except Exception as exc:
            return error_response(api_error_for(exc))

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
        except ApiError as exc:
            return error_response(exc)
        entry = {"id": self.limits.served_model_name, "object": "model", "created": 0, "owned_by": "zimage-serve",
                 "root": self.model_name, "random_weights": self.random_weights}
        return JSONResponse({"object": "list", "data": [entry]})

    @app.get("/v1/styles")
    async def styles(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            table = await self.styler.list_styles.remote()
            default = await self.styler.default_style.remote()
        except Exception as exc:
            return error_response(api_error_for(exc))
        return JSONResponse({"object": "list", "default": default,
                             "data": [{"name": name, "template": template} for name, template in table.items()]})

    @app.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        """The web page (Generate and Transform); it and its files need no key, the API calls it makes do."""
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/page/settings", include_in_schema=False)
    async def page_settings(self) -> JSONResponse:
        """What the page's form offers, from the server's own rules; public, as it holds no secret."""
        limits = self.limits
        return JSONResponse({
            "size_presets": [list(size) for size in SIZE_PRESETS], "min_side": MIN_SIDE, "max_side": MAX_SIDE,
            "side_multiple": SIDE_MULTIPLE, "max_pixels": limits.max_pixels, "min_steps": limits.min_steps,
            "max_steps": limits.max_steps, "default_steps": limits.default_steps,
            "max_images": limits.max_images_per_request, "api_keys_required": bool(limits.api_key_sha256),
        })

    @app.get("/health/live")
    async def live(self) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    @app.get("/health/ready")
    async def ready(self) -> JSONResponse:
        states = {}
        for name, handle in self.stages:
            try:
                states[name] = bool(await asyncio.wait_for(handle.ready.remote(), timeout=5.0))
            except Exception:
                states[name] = False
        ok = all(states.values())
        return JSONResponse({"status": "ready" if ok else "not_ready", "stages": states}, status_code=200 if ok else 503)

    # ---- request handling ----------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self.limits.api_key_sha256:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
        digest = hashlib.sha256(token.strip().encode()).hexdigest().encode()
        if not any(hmac.compare_digest(digest, known.encode()) for known in self.limits.api_key_sha256):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    @staticmethod
    def _require_content_type(request: Request, expected: str) -> None:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != expected:
            raise ApiError(415, f"Content-Type must be {expected}, got {content_type or 'none'}.",
                           code="unsupported_media_type")

    @staticmethod
    def _check_declared_length(request: Request, cap: int) -> None:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise ApiError(413, f"The request body is {declared} bytes, over the limit of {cap}.",
                           code="request_too_large")

    async def _read_body(self, request: Request, cap: int) -> bytes:
        self._check_declared_length(request, cap)
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > cap:
                raise ApiError(413, f"The request body is over the limit of {cap} bytes.", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _split_form(self, form) -> tuple[dict, bytes]:
        fields: dict = {}
        images = []
        for key, value in form.multi_items():
            if key in ("image", "image[]"):
                images.append(value)
            elif key == "mask":
                raise bad_request("Masks are not supported; the whole image is edited.", param="mask",
                                  code="unsupported_parameter")
            elif hasattr(value, "read"):
                raise bad_request(f"Unexpected file field '{key}'.", param=key, code="unknown_parameter")
            else:
                fields[key] = value
        if not images:
            raise ApiError(400, "Missing required parameter: 'image'.", param="image", code="missing_required_parameter")
        if len(images) > 1 or not hasattr(images[0], "read"):
            raise bad_request("Send exactly one image file.", param="image", code="invalid_image")
        data = await images[0].read(self.limits.max_upload_bytes + 1)
        return fields, data

    @contextlib.contextmanager
    def _admitted(self):
        if self.inflight >= self.limits.max_inflight_requests:
            raise ApiError(503, "The server is at capacity; retry shortly.", code="overloaded")
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def _admit_and_run(self, plan: RequestPlan) -> ImageResult:
        with self._admitted():
            try:
                return await asyncio.wait_for(self.pipeline.run(plan), timeout=self.limits.request_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(503, "The request did not finish in time; retry shortly.", code="timeout") from None

    async def _admit_and_stream(self, plan: RequestPlan, partial_images: int) -> AsyncIterator[StreamItem]:
        """`pipeline.stream` under admission and the request deadline."""
        with self._admitted():
            items = self.pipeline.stream(plan, partial_images)
            deadline = time.monotonic() + self.limits.request_timeout_s
            try:
                while True:
                    try:
                        yield await asyncio.wait_for(anext(items), timeout=deadline - time.monotonic())
                    except StopAsyncIteration:
                        return
                    except asyncio.TimeoutError:
                        raise ApiError(503, "The request did not finish in time; retry shortly.",
                                       code="timeout") from None
            finally:
                await items.aclose()

    async def _stream(self, plan: RequestPlan, req: ImageOptions, kind: StreamKind) -> StreamingResponse:
        """Server-sent events (serve_app.streaming). The first step is awaited before the headers go
        out, so a request that cannot start still gets a JSON error with its status."""
        items = self._admit_and_stream(plan, req.partial_images or 0)
        first = await anext(items)
        headers = {**SSE_HEADERS, **({"X-Random-Weights": "true"} if self.random_weights else {})}
        return StreamingResponse(sse_body(first, items, StreamEvents(kind, req, plan)),
                                 media_type="text/event-stream", headers=headers)

    async def _respond(self, result: ImageResult, req: ImageOptions) -> Response:
        """The OpenAI images response; base64 and JSON encoding (megabytes) run off the event loop."""
        first = result.images[0]
        body = ImagesResponse(
            created=int(time.time()),
            data=[ImageObject(b64_json="", revised_prompt=img.revised_prompt, seed=img.seed) for img in result.images],
            model=self.limits.served_model_name,
            size=f"{first.width}x{first.height}",
            output_format=first.format,
            timings=result.timings,
            random_weights=result.random_weights,
        )
        content = await asyncio.to_thread(json_with_base64_images, body.model_dump(), [img.data for img in result.images])
        headers = {"X-Random-Weights": "true"} if result.random_weights else None
        return Response(content, media_type="application/json", headers=headers)
