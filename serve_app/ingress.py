"""The Ingress deployment: HTTP routes (OpenAI's images API) and the Python handle API.

The routes only wire the parts together: keys (serve_app.auth), each entry point's request to a plan
(serve_app.planning), admission and deadlines (serve_app.admission), the run through the stages
(serve_app.pipeline), and the response with its access-log line (serve_app.responses). Every
failure leaves as one error shape.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from deployments.geometry import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, SIZE_PRESETS
from deployments.runtime.stage import deep_merge
from serve_app import access_log
from serve_app.access_log import LOGGED_BY_ROUTE, AccessLogMiddleware, AccessRecord
from serve_app.admission import TIMEOUT_HEADER, Admission, Ticket, timeout_s
from serve_app.auth import authorize, if_authorized
from serve_app.config import ApiLimits
from serve_app.control import ControlNetInfo, control_preview_response
from serve_app.errors import ApiError, api_error_for, error_response
from serve_app.image_store import FILES_ROUTE
from serve_app.image_store.serving import file_response, replica_store, request_base_url, stored, stored_stream
from serve_app.loras import LoraCatalog
from serve_app.metrics import IngressMetrics
from serve_app.pipeline import ImagePipeline, RequestPlan
from serve_app.planning import PlannedRequest, plan_edit, plan_generation, plan_handle_request
from serve_app.protocol import ImageEditRequest, ImageGenerationRequest, ImageRequest, ImageResult, ImagesResponse
from serve_app.readiness import ReadinessProbe
from serve_app.responses import Responder, images_response
from serve_app.streaming import StreamEvents

logger = logging.getLogger("ray.serve")

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
app.add_middleware(AccessLogMiddleware)  # a line for each request the image routes do not log themselves


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    messages = {404: f"No route {request.url.path}.", 405: f"Method {request.method} is not allowed here."}
    return error_response(ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail))))


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
    schema["properties"]["control_image"] = {"type": "string", "format": "binary"}  # serve_app.control
    schema["required"] = ["image", "prompt"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


# A replica Serve stops answers its in-flight requests first, up to the default request timeout.
@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=512,
                  graceful_shutdown_timeout_s=600)
@serve.ingress(app)
class Ingress:
    config_model = IngressConfig

    def __init__(self, styler, text_encoder, denoiser, vae, model_name: str, random_weights: bool,
                 base_config: dict | None = None, image_store: dict | None = None, lora_settings: dict | None = None,
                 controlnet: str | None = None):
        self.styler = styler
        self.loras = LoraCatalog(lora_settings)  # the adapters requests may name (serve_app.loras)
        self.images = replica_store(image_store)  # response_format "url" (serve_app.image_store)
        self.readiness = ReadinessProbe(serve.get_replica_context().app_name,
                                        ["PromptStyler", "TextEncoder", "Denoiser", "VaeDecoder"])
        self.pipeline = ImagePipeline(styler, text_encoder, denoiser, vae, random_weights)
        self.base_config = dict(base_config or {})
        self.reconfigure({})
        self.model_name = model_name
        self.random_weights = random_weights
        self.controlnet = ControlNetInfo(controlnet, denoiser)  # control fields need one; edits, one that inpaints
        self.controlnet.learn_in_background()  # for the page's settings, once the Denoiser is ready
        self.metrics = IngressMetrics()
        self.admission = Admission(self.metrics.in_flight)
        self.responder = Responder(self.metrics, self.admission.retry_after_s)
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
            timeout = timeout_s(request.timeout_s, self.limits.request_timeout_s, "timeout_s")
            with self._admitted() as ticket:
                plan = await plan_handle_request(request, self.limits, self.model_name, self.controlnet)
                result = await self._run(plan, timeout, record, ticket)
                result = await stored(result, self.images, request.response_format, None)
        except Exception as exc:
            error = self.responder.with_retry_after(api_error_for(exc))
            self.responder.finish(record, error.status, error.code)
            raise
        self.responder.finish(record, 200)
        return result

    # ---- HTTP routes ---------------------------------------------------------------------------

    @app.post("/v1/images/generations", response_model=ImagesResponse,
              openapi_extra=_json_schema_body(ImageGenerationRequest))
    async def generations(self, request: Request) -> Response:
        return await self._images(request, "/v1/images/generations",
                                  partial(plan_generation, controlnet=self.controlnet))

    @app.post("/v1/images/edits", response_model=ImagesResponse, openapi_extra=_multipart_schema_body())
    async def edits(self, request: Request) -> Response:
        return await self._images(request, "/v1/images/edits",
                                  partial(plan_edit, controlnet=self.controlnet))

    @app.get(FILES_ROUTE + "{name}", include_in_schema=False)
    async def image_file(self, name: str) -> Response:
        """A `response_format: "url"` image in the local store. No key: the URL is the capability
        (unguessable, expiring), so a browser or another service can fetch it as it is."""
        return await file_response(self.images, name)

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            authorize(request.headers, self.limits.api_key_sha256)
        except ApiError as exc:
            return error_response(exc)
        entry = {"id": self.limits.served_model_name, "object": "model", "created": 0, "owned_by": "zimage-serve",
                 "root": self.model_name, "random_weights": self.random_weights}
        return JSONResponse({"object": "list", "data": [entry]})

    @app.get("/v1/loras")
    async def list_loras(self, request: Request) -> JSONResponse:
        try:
            authorize(request.headers, self.limits.api_key_sha256)
            return JSONResponse(await self.loras.listing())
        except Exception as exc:
            return error_response(api_error_for(exc))

    @app.get("/v1/styles")
    async def styles(self, request: Request) -> JSONResponse:
        try:
            authorize(request.headers, self.limits.api_key_sha256)
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
            "controlnet": self.controlnet.loaded, "max_loras": limits.max_loras_per_request,
            # the ControlNet's channels, and whether an edit may use it (it inpaints); null until the
            # Denoiser has answered (serve_app.control.ControlNetInfo)
            "control_channels": self.controlnet.channels, "controlnet_inpaints": self.controlnet.inpaints,
        })

    @app.post("/page/control-preview", include_in_schema=False)
    async def control_preview(self, request: Request) -> Response:
        """The Control section's canny preview: the edge map the server makes (serve_app.control)."""
        try:
            authorize(request.headers, self.limits.api_key_sha256)
            return await control_preview_response(request, self.limits, self.controlnet.loaded)
        except Exception as exc:
            return error_response(api_error_for(exc))

    @app.get("/health/live")
    async def live(self) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    @app.get("/health/ready")
    async def ready(self) -> JSONResponse:
        """From the control plane (serve_app.readiness): answers at once, even under full load."""
        snapshot = await self.readiness.check()
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

    def _if_authorized(self, request: Request, page: Callable[[], Response]) -> Response:
        return if_authorized(request.headers, self.limits.api_key_sha256, page)

    @staticmethod
    def _route_prefix(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    # ---- the images routes' one path -----------------------------------------------------------

    async def _images(self, request: Request, route: str,
                      plan_route: Callable[[Request, ApiLimits, str], Awaitable[PlannedRequest]]) -> Response:
        """Both image routes: key, deadline, body to plan, then a JSON answer or a stream."""
        record = AccessRecord(route, method=request.method)
        request.scope.setdefault("state", {})[LOGGED_BY_ROUTE] = True  # its line has the request's fields
        try:
            authorize(request.headers, self.limits.api_key_sha256)
            timeout = timeout_s(request.headers.get(TIMEOUT_HEADER), self.limits.request_timeout_s)
            with self._admitted() as ticket:  # before the body is read: a refusal costs next to nothing
                planned = await plan_route(request, self.limits, self.model_name)
                if planned.options.stream:
                    return await self._stream(planned, timeout, record, request_base_url(request), ticket)
                result = await self._run(planned.plan, timeout, record, ticket)
                result = await stored(result, self.images, planned.options.response_format,
                                      request_base_url(request))
            return self.responder.answered(record, await images_response(result, self.limits.served_model_name))
        except asyncio.CancelledError:
            self.responder.finish(record, 499, "client_closed_request")
            raise
        except Exception as exc:
            return self.responder.failed(record, api_error_for(exc))

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[Ticket]:
        """A place among the admitted requests for the block; a started stream takes its ticket over."""
        ticket = self.admission.enter(self.limits.max_inflight_requests)
        try:
            yield ticket
        finally:
            if not ticket.streaming:
                ticket.release()

    async def _run(self, plan: RequestPlan, timeout: float, record: AccessRecord, ticket: Ticket) -> ImageResult:
        record.describe(plan)
        await self.loras.check_plan(plan)
        result = await self.admission.run(self.pipeline, plan, timeout, ticket)
        record.took(result)
        return result

    async def _stream(self, planned: PlannedRequest, timeout: float, record: AccessRecord, base_url: str,
                      ticket: Ticket) -> Response:
        """The first step is awaited before the headers go out, so a request that cannot start still
        gets a JSON error with its status. With `response_format: "url"` the final image is stored
        before its event goes out (a store failure is an `error` event)."""
        record.describe(planned.plan)
        await self.loras.check_plan(planned.plan)
        items = access_log.noting(self.admission.stream(self.pipeline, planned.plan, planned.options.partial_images or 0,
                                                        timeout, ticket), record)
        items = stored_stream(items, self.images, planned.options.response_format, base_url)
        first = await anext(items)
        ticket.streaming = True  # from here the stream's generators release the ticket
        events = StreamEvents(planned.kind, planned.options, planned.plan)
        return self.responder.stream(first, items, events, record, self.random_weights)
