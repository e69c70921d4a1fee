"""The Ingress deployment: HTTP routes (OpenAI's images API) and the Python handle API.

The routes only wire the parts together: keys and their tenants (serve_app.auth, serve_app.tenants),
each entry point's request to a plan (serve_app.planning), admission, fair release and deadlines
(serve_app.admission), the run through the stages (serve_app.pipeline), and the response with its
access-log line and its key's rate-limit headers (serve_app.responses). Every failure leaves as one
error shape.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from functools import partial

from fastapi import Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.responses import HTMLResponse, JSONResponse, Response

from deployments.geometry import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, SIZE_PRESETS
from deployments.runtime.stage import deep_merge
from serve_app import access_log
from serve_app.access_log import LOGGED_BY_ROUTE, AccessRecord
from serve_app.admission import TIMEOUT_HEADER, Admission, Ticket, timeout_s
from serve_app.auth import authorize, declared_tenant, if_authorized
from serve_app.config import ApiLimits, config_problem
from serve_app.control import ControlNetInfo, control_preview_response
from serve_app.errors import api_error_for, error_response
from serve_app.http_app import app, json_schema_body, multipart_schema_body, page_html
from serve_app.image_store import FILES_ROUTE
from serve_app.image_store.serving import file_response, replica_store, request_base_url, stored, stored_stream
from serve_app.loras import LoraCatalog
from serve_app.metrics import IngressMetrics
from serve_app.pipeline import ImagePipeline, RequestPlan
from serve_app.planning import PlannedRequest, plan_edit, plan_generation, plan_handle_request
from serve_app.protocol import ImageGenerationRequest, ImageRequest, ImageResult, ImagesResponse, KeyUsage
from serve_app.readiness import ReadinessProbe
from serve_app.responses import Responder, images_response
from serve_app.streaming import StreamEvents
from serve_app.tenants.keys import ANONYMOUS, UNNAMED, KeyTable, Tenant, merge_by_name
from serve_app.tenants.release import ReleaseGate

logger = logging.getLogger("ray.serve")

class IngressConfig(BaseModel):
    """The Ingress's live config: the API's limits, the accepted keys and their limits and weights."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    api: ApiLimits = Field(default_factory=ApiLimits)


def merged_config(base: dict, override: dict | None) -> dict:
    """`override` over `base` (deep_merge), with `api.keys` merged by name (tenants.keys.merge_by_name)."""
    merged = deep_merge(base, override)
    keys = ((override or {}).get("api") or {}).get("keys")
    if isinstance(keys, list) and isinstance(base.get("api", {}).get("keys"), list):
        merged["api"]["keys"] = merge_by_name(base["api"]["keys"], keys)
    return merged


def start_routers(*handles) -> None:
    """Each stage handle's router, started with the replica rather than by its first request: that
    request then waits for no router to learn the stage's replicas, and Ray's one-time router line
    goes to the replica's log as a start-up line, not into the first request's terminal output."""
    for handle in handles:
        if not handle.is_initialized:
            handle._init()  # Ray Serve's own way to initialize a handle before its first `.remote()`


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
        start_routers(styler, text_encoder, denoiser, vae)
        self.loras = LoraCatalog(lora_settings)  # the adapters requests may name (serve_app.loras)
        self.images = replica_store(image_store)  # response_format "url" (serve_app.image_store)
        context = serve.get_replica_context()
        self.deployment_name = context.deployment  # its running replicas share the keys' limits
        self.readiness = ReadinessProbe(context.app_name, ["PromptStyler", "TextEncoder", "Denoiser", "VaeDecoder"])
        self.pipeline = ImagePipeline(styler, text_encoder, denoiser, vae, random_weights)
        self.metrics = IngressMetrics()
        self.admission = Admission(self.metrics.in_flight, self.metrics.refused,
                                   ReleaseGate(on_wait=self.metrics.released, on_waiting=self.metrics.waiting))
        self.responder = Responder(self.metrics, self.admission.retry_after_s, self.admission.ledger.headers)
        self.base_config = dict(base_config or {})
        self.updates = 0  # live configs applied: this constructor's and Serve's first must validate
        self.reconfigure({})
        self.model_name = model_name
        self.random_weights = random_weights
        self.controlnet = ControlNetInfo(controlnet, denoiser)  # control fields need one; edits, one that inpaints
        self.controlnet.learn_in_background()  # for the page's settings, once the Denoiser is ready
        if random_weights:
            logger.warning("serving model %r with RANDOM weights: images carry no meaning", model_name)

    def reconfigure(self, user_config: dict) -> None:
        """`user_config` over the bound `base_config` (see deployments.runtime.stage): an override of
        one limit keeps the others, and the keys that `args` gave (`api.keys` merge by name).

        A live update that does not validate is refused: the replica keeps its config and logs why,
        naming the entry (a reconfigure that raised would make Serve stop the replica, dropping what
        it admitted). A replica's first config, from Serve as it starts, is not refused but fails it."""
        try:
            config = IngressConfig.model_validate(merged_config(self.base_config, user_config))
            limits = config.api.with_env_keys()
        except (ValueError, OSError) as exc:  # pydantic's ValidationError is a ValueError
            if self.updates < 2:
                raise
            logger.error("Ingress live config refused, the previous config stays: %s", config_problem(exc))
            self.metrics.config_refused.set(1)
            return
        self.updates += 1
        self.limits = limits
        self.keys = KeyTable(limits.keys, limits.api_key_sha256)
        self.admission.ledger.forget_except([*self.keys.names(), ANONYMOUS.name, UNNAMED.name])
        self.metrics.config_refused.set(0)
        self._share_out()

    def _share_out(self) -> None:
        """The keys' limits and the release window, divided by the running replicas (serve_app.readiness
        counts them): each Ingress replica holds its share, the window grows with the Denoisers."""
        snapshot = self.readiness.current
        ingresses = snapshot.running(self.deployment_name)
        self.admission.ledger.replicas = ingresses
        window = self.limits.release_window
        gate = self.admission.gate
        gate.set_window(None if window is None else max(1.0, window * snapshot.running("Denoiser") / ingresses))
        self.metrics.released_images.set(gate.window or 0.0, {"kind": "window"})
        self.metrics.released_images.set(gate.in_flight, {"kind": "in_flight"})

    # ---- the Python handle API -----------------------------------------------------------------

    async def generate(self, request: ImageRequest) -> ImageResult:
        """For other Ray applications: `await serve.get_app_handle(name).generate.remote(ImageRequest(...))`."""
        record = AccessRecord("handle:generate")
        try:
            record.tenant = declared_tenant(request.tenant, self.keys)  # trusted: a handle call has no key
            timeout = timeout_s(request.timeout_s, self.limits.request_timeout_s, "timeout_s")
            with self._admitted(record.tenant) as ticket:
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
              openapi_extra=json_schema_body(ImageGenerationRequest))
    async def generations(self, request: Request) -> Response:
        return await self._images(request, "/v1/images/generations",
                                  partial(plan_generation, controlnet=self.controlnet))

    @app.post("/v1/images/edits", response_model=ImagesResponse, openapi_extra=multipart_schema_body())
    async def edits(self, request: Request) -> Response:
        return await self._images(request, "/v1/images/edits",
                                  partial(plan_edit, controlnet=self.controlnet))

    @app.get(FILES_ROUTE + "{name}", include_in_schema=False)
    async def image_file(self, name: str) -> Response:
        """A `response_format: "url"` image in the local store. No key: the URL is the capability
        (unguessable, expiring), so a browser or another service can fetch it as it is."""
        return await file_response(self.images, name)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def listing(_: Tenant) -> JSONResponse:
            entry = {"id": self.limits.served_model_name, "object": "model", "created": 0,
                     "owned_by": "zimage-serve", "root": self.model_name, "random_weights": self.random_weights}
            return JSONResponse({"object": "list", "data": [entry]})

        return await self._keyed(request, listing)

    @app.get("/v1/loras")
    async def list_loras(self, request: Request) -> Response:
        async def listing(_: Tenant) -> JSONResponse:
            return JSONResponse(await self.loras.listing())

        return await self._keyed(request, listing)

    @app.get("/v1/styles")
    async def styles(self, request: Request) -> Response:
        async def listing(_: Tenant) -> JSONResponse:
            table = await self.styler.list_styles.remote()
            default = await self.styler.default_style.remote()
            return JSONResponse({"object": "list", "default": default,
                                 "data": [{"name": name, "template": template} for name, template in table.items()]})

        return await self._keyed(request, listing)

    @app.get("/v1/usage", response_model=KeyUsage)
    async def usage(self, request: Request) -> Response:
        """The caller's own key, as this replica counts it: places in flight, images in the last minute,
        refusals. It answers for the key that asks and no other."""
        async def own_usage(tenant: Tenant) -> JSONResponse:
            self._share_out()
            body = KeyUsage(**self.admission.ledger.usage(tenant), ingress_replicas=self.admission.ledger.replicas,
                            waiting=self.admission.gate.waiting(tenant.name))
            return JSONResponse(body.model_dump())

        return await self._keyed(request, own_usage)

    @app.get("/", include_in_schema=False)
    async def page(self, request: Request) -> HTMLResponse:
        """The web page (Generate and Transform); it and its files need no key, the API calls it makes do.
        Its base is the app's route prefix, so that it works wherever the app is served."""
        return HTMLResponse(page_html(self._route_prefix(request)))

    @app.get("/page/settings", include_in_schema=False)
    async def page_settings(self) -> JSONResponse:
        """What the page's form offers, from the server's own rules; public, as it holds no secret."""
        limits = self.limits
        return JSONResponse({
            "size_presets": [list(size) for size in SIZE_PRESETS], "min_side": MIN_SIDE, "max_side": MAX_SIDE,
            "side_multiple": SIDE_MULTIPLE, "max_pixels": limits.max_pixels, "min_steps": limits.min_steps,
            "max_steps": limits.max_steps, "default_steps": limits.default_steps,
            "max_images": limits.max_images_per_request, "api_keys_required": self.keys.required,
            "controlnet": self.controlnet.loaded, "max_loras": limits.max_loras_per_request,
            # the ControlNet's channels, and whether an edit may use it (it inpaints); null until the
            # Denoiser has answered (serve_app.control.ControlNetInfo)
            "control_channels": self.controlnet.channels, "controlnet_inpaints": self.controlnet.inpaints,
        })

    @app.post("/page/control-preview", include_in_schema=False)
    async def control_preview(self, request: Request) -> Response:
        """The Control section's canny preview: the edge map the server makes (serve_app.control)."""
        return await self._keyed(request, lambda _: control_preview_response(request, self.limits,
                                                                               self.controlnet.loaded))

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
        return if_authorized(request.headers, self.keys, page)

    async def _keyed(self, request: Request, answer: Callable[[Tenant], Awaitable[Response]]) -> Response:
        """A keyed route's answer for the request's tenant, or its error, with the key's rate-limit headers."""
        tenant = None
        try:
            tenant = authorize(request.headers, self.keys)
            response = await answer(tenant)
        except Exception as exc:
            response = error_response(api_error_for(exc))
        return self.responder.with_rate_headers(response, tenant)

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
            record.tenant = authorize(request.headers, self.keys)
            timeout = timeout_s(request.headers.get(TIMEOUT_HEADER), self.limits.request_timeout_s)
            with self._admitted(record.tenant) as ticket:  # before the body is read: a refusal costs next to nothing
                planned = await plan_route(request, self.limits, self.model_name)
                if planned.options.stream:
                    return await self._stream(planned, timeout, record, request_base_url(request), ticket)
                result = await self._run(planned.plan, timeout, record, ticket)
                result = await stored(result, self.images, planned.options.response_format,
                                      request_base_url(request))
                response = await images_response(result, self.limits.served_model_name)  # still in its window
            return self.responder.answered(record, response)
        except asyncio.CancelledError:
            self.responder.finish(record, 499, "client_closed_request")
            raise
        except Exception as exc:
            return self.responder.failed(record, api_error_for(exc))

    @contextlib.contextmanager
    def _admitted(self, tenant: Tenant) -> Iterator[Ticket]:
        """A place among the admitted requests (and its key's) for the block; a started stream takes its
        ticket over."""
        self._share_out()
        ticket = self.admission.enter(self.limits.max_inflight_requests, tenant)
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
