"""The Ingress deployment: HTTP routes (OpenAI's images API) and the Python handle API.

It authenticates, parses and validates; the request's plan and its run through the stages are
`serve_app.pipeline`'s. Every failure leaves as one error shape.
"""

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from deployments.geometry import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, SIZE_PRESETS
from deployments.runtime.stage import deep_merge
from serve_app import access_log, request_io
from serve_app.access_log import AccessRecord
from serve_app.config import ApiLimits
from serve_app.errors import (
    ApiError,
    api_error_for,
    bad_request,
    deadline_exceeded,
    error_response,
    from_validation_error,
)
from serve_app.image_io import decode_upload, json_with_base64_images
from serve_app.masks import decode_mask
from serve_app.metrics import IngressMetrics
from serve_app.pipeline import ImagePipeline, RequestPlan, plan_request
from serve_app.readiness import ReadinessProbe
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

TIMEOUT_HEADER = "x-request-timeout"

WEB_DIR = Path(__file__).parent / "web"  # the page: static files, no build step, nothing from the network

# The API docs are routes of the Ingress below, so that they need a key when keys are on.
app = FastAPI(
    title="zimage-serve",
    description="Z-Image-Turbo behind an OpenAI-compatible images API.",
    version="0.1.0",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
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
    schema["properties"]["mask"] = {"type": "string", "format": "binary"}  # inpainting (serve_app.masks)
    schema["required"] = ["image", "prompt"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


# A replica Serve stops answers its in-flight requests first, up to the default request timeout.
@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512,
                  graceful_shutdown_timeout_s=600)
@serve.ingress(app)
class Ingress:
    config_model = IngressConfig

    def __init__(self, styler, text_encoder, denoiser, vae, model_name: str, random_weights: bool,
                 base_config: dict | None = None):
        self.styler = styler
        self.readiness = ReadinessProbe(serve.get_replica_context().app_name,
                                        ["PromptStyler", "TextEncoder", "Denoiser", "VaeDecoder"])
        self.pipeline = ImagePipeline(styler, text_encoder, denoiser, vae, random_weights)
        self.base_config = dict(base_config or {})
        self.reconfigure({})
        self.model_name = model_name
        self.random_weights = random_weights
        self.inflight = 0
        self.metrics = IngressMetrics()
        if random_weights:
            logger.warning("serving model %r with RANDOM weights: images carry no meaning", model_name)

    def reconfigure(self, user_config: dict) -> None:
        """`user_config` over the bound `base_config` (see deployments.runtime.stage): an override of
        one limit keeps the others and the key digests that `args` gave."""
        config = IngressConfig.model_validate(deep_merge(self.base_config, user_config))
        self.limits = config.api.with_env_keys()

    # ---- the Python handle API -----------------------------------------------------------------

    async def generate(self, request: ImageRequest) -> ImageResult:
        """For other Ray applications: `await serve.get_app_handle(name).generate.remote(ImageRequest(...))`."""
        record = AccessRecord("handle:generate")
        try:
            result = await self._generate(request, record)
        except Exception as exc:
            error = api_error_for(exc)
            self._finish(record, error.status, error.code)
            raise
        self._finish(record, 200)
        return result

    async def _generate(self, request: ImageRequest, record: AccessRecord) -> ImageResult:
        timeout_s = self._timeout_s(request.timeout_s, "timeout_s")
        init = mask = None
        if request.init_image is not None:
            init = decode_upload(request.init_image, self.limits.max_upload_bytes, self.limits.max_upload_pixels)
        if request.mask is not None:
            if init is None:
                raise bad_request("A mask needs init_image, the image to edit.", param="mask", code="invalid_mask")
            mask = decode_mask(request.mask, init.size, self.limits.max_upload_bytes, self.limits.max_upload_pixels)
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
        return await self._admit_and_run(plan_request(parsed, init, self.limits, self.model_name, mask), timeout_s,
                                         record)

    # ---- HTTP routes ---------------------------------------------------------------------------

    @app.post("/v1/images/generations", response_model=ImagesResponse, openapi_extra=_json_schema_body(ImageGenerationRequest))
    async def generations(self, request: Request) -> JSONResponse:
        record = AccessRecord("/v1/images/generations")
        try:
            self._authorize(request)
            timeout_s = self._timeout_s(request.headers.get(TIMEOUT_HEADER))
            data = await request_io.read_json_object(request, self.limits.max_body_bytes)
            parsed = ImageGenerationRequest.model_validate(data)
            plan = plan_request(parsed, None, self.limits, self.model_name)
            if parsed.stream:
                return await self._stream(plan, parsed, "image_generation", timeout_s, record)
            result = await self._admit_and_run(plan, timeout_s, record)
            return self._answered(record, await self._respond(result, parsed))
        except asyncio.CancelledError:
            self._finish(record, 499, "client_closed_request")
            raise
        except Exception as exc:
            return self._failed(record, api_error_for(exc))

    @app.post("/v1/images/edits", response_model=ImagesResponse, openapi_extra=_multipart_schema_body())
    async def edits(self, request: Request) -> JSONResponse:
        record = AccessRecord("/v1/images/edits")
        try:
            self._authorize(request)
            timeout_s = self._timeout_s(request.headers.get(TIMEOUT_HEADER))
            form = await request_io.read_edit_form(request, self.limits.max_body_bytes, self.limits.max_upload_bytes)
            parsed = ImageEditRequest.model_validate(form.fields)
            init = decode_upload(form.image, self.limits.max_upload_bytes, self.limits.max_upload_pixels)
            mask = None if form.mask is None else decode_mask(form.mask, init.size, self.limits.max_upload_bytes,
                                                              self.limits.max_upload_pixels)
            plan = plan_request(parsed, init, self.limits, self.model_name, mask)
            if parsed.stream:
                return await self._stream(plan, parsed, "image_edit", timeout_s, record)
            result = await self._admit_and_run(plan, timeout_s, record)
            return self._answered(record, await self._respond(result, parsed))
        except asyncio.CancelledError:
            self._finish(record, 499, "client_closed_request")
            raise
        except Exception as exc:
            return self._failed(record, api_error_for(exc))

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
        """From the control plane's last snapshot (serve_app.readiness): answers at once, even under full load."""
        snapshot = self.readiness.current
        ok = snapshot.ready(self.readiness.stale_s)
        return JSONResponse({"status": "ready" if ok else "not_ready", "stages": snapshot.stages},
                            status_code=200 if ok else 503)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Response:
        return self._if_authorized(request, lambda: JSONResponse(app.openapi()))

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Response:
        url = self._route_prefix(request) + "/openapi.json"
        return self._if_authorized(request, lambda: get_swagger_ui_html(openapi_url=url, title=app.title))

    @app.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> Response:
        url = self._route_prefix(request) + "/openapi.json"
        return self._if_authorized(request, lambda: get_redoc_html(openapi_url=url, title=app.title))

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

    def _if_authorized(self, request: Request, page) -> Response:
        """The API docs follow the key setting like every other non-health route."""
        try:
            self._authorize(request)
        except ApiError as exc:
            return error_response(exc)
        return page()

    @staticmethod
    def _route_prefix(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    def _timeout_s(self, asked: str | float | None, param: str = "X-Request-Timeout") -> float:
        """The request's time budget: the client's (X-Request-Timeout, or the handle API's
        `timeout_s`), capped by the server's `api.request_timeout_s`."""
        cap = self.limits.request_timeout_s
        if asked is None:
            return cap
        try:
            value = float(asked)
        except (TypeError, ValueError):
            value = float("nan")
        if not 0 < value < float("inf"):
            raise bad_request(f"{param} must be a positive number of seconds.", param=param, code="invalid_timeout")
        return min(value, cap)

    @contextlib.contextmanager
    def _admitted(self):
        if self.inflight >= self.limits.max_inflight_requests:
            raise ApiError(503, "The server is at capacity; retry shortly.", code="overloaded")
        self.inflight += 1
        self.metrics.in_flight.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= 1
            self.metrics.in_flight.set(self.inflight)

    async def _admit_and_run(self, plan: RequestPlan, timeout_s: float, record: AccessRecord) -> ImageResult:
        """Runs the plan within `timeout_s`; the deadline travels with it, so the stages drop its work."""
        record.describe(plan)
        with self._admitted():
            try:
                result = await asyncio.wait_for(self.pipeline.run(plan, time.time() + timeout_s), timeout=timeout_s)
            except asyncio.TimeoutError:
                raise deadline_exceeded(timeout_s) from None
        record.images, record.timings = len(result.images), result.timings
        return result

    async def _admit_and_stream(self, plan: RequestPlan, partial_images: int, timeout_s: float
                                ) -> AsyncIterator[StreamItem]:
        """`pipeline.stream` under admission and the request's deadline (which travels with it too)."""
        with self._admitted():
            deadline = time.monotonic() + timeout_s
            items = self.pipeline.stream(plan, partial_images, time.time() + timeout_s)
            try:
                while True:
                    try:
                        yield await asyncio.wait_for(anext(items), timeout=deadline - time.monotonic())
                    except StopAsyncIteration:
                        return
                    except asyncio.TimeoutError:
                        raise deadline_exceeded(timeout_s) from None
            finally:
                await items.aclose()

    async def _stream(self, plan: RequestPlan, req: ImageOptions, kind: StreamKind, timeout_s: float,
                      record: AccessRecord) -> StreamingResponse:
        """Server-sent events (serve_app.streaming). The first step is awaited before the headers go
        out, so a request that cannot start still gets a JSON error with its status."""
        record.describe(plan)
        items = self._admit_and_stream(plan, req.partial_images or 0, timeout_s)
        first = await anext(items)
        self.metrics.streamed(record)
        headers = {**SSE_HEADERS, **({"X-Random-Weights": "true"} if self.random_weights else {})}
        body = sse_body(first, items, StreamEvents(kind, req, plan))
        return StreamingResponse(self._logged(body, record), media_type="text/event-stream", headers=headers)

    async def _logged(self, body: AsyncIterator[bytes], record: AccessRecord) -> AsyncIterator[bytes]:
        """A stream's body, counted; its access-log line is written when it ends (an error after the
        stream started travels as an event, so the status stays 200)."""
        status, code = 200, None
        try:
            async for chunk in body:
                record.bytes_out += len(chunk)
                yield chunk
        except asyncio.CancelledError:
            status, code = 499, "client_closed_request"
            raise
        finally:
            self._finish(record, status, code)

    def _answered(self, record: AccessRecord, response: Response) -> Response:
        record.bytes_out = len(response.body)
        self._finish(record, response.status_code)
        return response

    def _failed(self, record: AccessRecord, error: ApiError) -> Response:
        response = error_response(error)
        record.bytes_out = len(response.body)
        self._finish(record, error.status, error.code)
        return response

    def _finish(self, record: AccessRecord, status: int, code: str | None = None) -> None:
        """The request's access-log line and metrics, once, however it ended."""
        record.status, record.code = status, code
        access_log.write(record)
        self.metrics.record(record)

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
