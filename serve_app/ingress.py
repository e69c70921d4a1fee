"""The Ingress deployment: HTTP routes (OpenAI's images API) and the Python handle API.

It validates, fans a request out into `n` images (image i uses seed + i), drives each image through
the stages by deployment handle, and encodes the results. Every failure leaves as one error shape.
"""


import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from deployments.core.contracts import DenoiseJob
from deployments.core.image_sizes import fit_upload, fitted_size, size_problem
from serve_app.config import ApiLimits
from serve_app.errors import ApiError, api_error_for, bad_request, error_response, from_validation_error
from serve_app.image_io import decode_upload, encode_output, json_with_base64_images
from serve_app.protocol import (
    GeneratedImage,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageObject,
    ImageOptions,
    ImageRequest,
    ImageResult,
    ImagesResponse,
    Timings,
)

logger = logging.getLogger("ray.serve")

DEFAULT_SIZE = (1024, 1024)
PUBLIC_PATHS = ("/health/live", "/health/ready", "/docs", "/openapi.json")

app = FastAPI(
    title="zimage-serve",
    description="Z-Image-Turbo behind an OpenAI-compatible images API.",
    version="0.1.0",
)


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


@dataclass(frozen=True)
class _Plan:
    """A validated request, ready to run."""

    prompt: str
    n: int
    width: int
    height: int
    steps: int
    seed: int
    style: str | None
    guidance_scale: float
    negative_prompt: str
    output_format: str
    output_compression: int | None
    init_image: Image.Image | None = None
    strength: float = 1.0


def _json_schema_body(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _multipart_schema_body() -> dict:
    schema = ImageEditRequest.model_json_schema()
    schema["properties"]["image"] = {"type": "string", "format": "binary"}
    schema["required"] = ["image", "prompt"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@serve.deployment(name="Ingress", max_ongoing_requests=512)
@serve.ingress(app)
class Ingress:
    def __init__(self, styler, text_encoder, denoiser, vae, model_name: str, random_weights: bool):
        self.styler = styler
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.vae = vae
        self.limits = ApiLimits().with_env_keys()
        self.model_name = model_name
        self.random_weights = random_weights
        self.inflight = 0
        if random_weights:
            logger.warning("serving model %r with RANDOM weights: images carry no meaning", model_name)

    def reconfigure(self, user_config: dict) -> None:
        unknown = set(user_config) - {"api"}
        if unknown:
            raise ValueError(f"Ingress: unknown user_config keys: {', '.join(sorted(unknown))}")
        self.limits = ApiLimits(**user_config.get("api", {})).with_env_keys()

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
        return await self._admit_and_run(self._plan(parsed, init))

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
            result = await self._admit_and_run(self._plan(parsed, None))
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
            result = await self._admit_and_run(self._plan(parsed, init))
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

    @app.get("/health/live")
    async def live(self) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    @app.get("/health/ready")
    async def ready(self) -> JSONResponse:
        stages = {"PromptStyler": self.styler, "TextEncoder": self.text_encoder, "Denoiser": self.denoiser,
                  "VaeDecoder": self.vae}
        states = {}
        for name, handle in stages.items():
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

    def _plan(self, req: ImageOptions, init: Image.Image | None) -> _Plan:
        limits = self.limits
        if req.model is not None and req.model not in (limits.served_model_name, self.model_name):
            raise ApiError(404, f"The model '{req.model}' does not exist; this server serves "
                                f"'{limits.served_model_name}'.", param="model", code="model_not_found")
        if req.response_format == "url":
            raise bad_request("response_format 'url' is not supported; use 'b64_json'.", param="response_format",
                              code="unsupported_value")
        n = req.n or 1
        if n > limits.max_images_per_request:
            raise bad_request(f"n must be at most {limits.max_images_per_request}.", param="n")
        steps = req.num_inference_steps or limits.default_steps
        if not limits.min_steps <= steps <= limits.max_steps:
            raise bad_request(f"num_inference_steps must be within {limits.min_steps}..{limits.max_steps}.",
                              param="num_inference_steps")
        if req.size in (None, "auto"):
            width, height = fitted_size(*init.size) if init is not None else DEFAULT_SIZE
        else:
            width, height = (int(v) for v in req.size.split("x"))
        problem = size_problem(width, height, limits.max_pixels)
        if problem:
            raise bad_request(f"Invalid size '{width}x{height}': {problem}.", param="size")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        return _Plan(
            prompt=req.prompt, n=n, width=width, height=height, steps=steps, seed=seed, style=req.style,
            guidance_scale=req.guidance_scale, negative_prompt=req.negative_prompt or "",
            output_format=req.output_format or "png", output_compression=req.output_compression,
            init_image=fit_upload(init, (width, height)) if init is not None else None,
            strength=getattr(req, "strength", 1.0),
        )

    async def _admit_and_run(self, plan: _Plan) -> ImageResult:
        if self.inflight >= self.limits.max_inflight_requests:
            raise ApiError(503, "The server is at capacity; retry shortly.", code="overloaded")
        self.inflight += 1
        try:
            return await asyncio.wait_for(self._run(plan), timeout=self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(503, "The request did not finish in time; retry shortly.", code="timeout") from None
        finally:
            self.inflight -= 1

    async def _run(self, plan: _Plan) -> ImageResult:
        started = time.perf_counter()
        styled = await self.styler.style.remote(plan.prompt, plan.style)
        styled_at = time.perf_counter()
        guided = plan.guidance_scale > 0
        caption_call = self.text_encoder.encode.remote(styled.text)
        negative_call = self.text_encoder.encode.remote(plan.negative_prompt) if guided else None
        posterior_call = self.vae.encode.remote(plan.init_image) if plan.init_image is not None else None
        caption = await caption_call
        negative = await negative_call if negative_call is not None else None
        encoded_at = time.perf_counter()
        posterior = await posterior_call if posterior_call is not None else None
        image_encoded_at = time.perf_counter()

        async def one_image(index: int) -> tuple[GeneratedImage, float, float, float]:
            job = DenoiseJob(
                caption=caption.embedding, width=plan.width, height=plan.height, steps=plan.steps,
                seed=plan.seed + index, guidance_scale=plan.guidance_scale,
                negative_caption=negative.embedding if negative is not None else None,
                init_posterior=posterior, strength=plan.strength if posterior is not None else 1.0,
            )
            t0 = time.perf_counter()
            latents = await self.denoiser.denoise.remote(job)
            t1 = time.perf_counter()
            decoded = await self.vae.decode.remote(latents)
            t2 = time.perf_counter()
            data = await asyncio.to_thread(encode_output, decoded.pixels, plan.output_format, plan.output_compression)
            t3 = time.perf_counter()
            image = GeneratedImage(data=data, format=plan.output_format, seed=job.seed, width=plan.width,
                                   height=plan.height, revised_prompt=styled.text)
            return image, t1 - t0, t2 - t1, t3 - t2

        outcomes = await asyncio.gather(*(one_image(i) for i in range(plan.n)))
        total = time.perf_counter() - started
        ms = 1000.0
        denoise = sum(o[1] for o in outcomes) * ms
        decode = sum(o[2] for o in outcomes) * ms
        output = sum(o[3] for o in outcomes) * ms
        timings = Timings(
            total_ms=round(total * ms, 2),
            style_ms=round((styled_at - started) * ms, 2),
            encode_ms=round((encoded_at - styled_at) * ms, 2),
            image_encode_ms=round((image_encoded_at - encoded_at) * ms, 2),
            denoise_ms=round(denoise, 2),
            decode_ms=round(decode, 2),
            output_encode_ms=round(output, 2),
        )
        return ImageResult(
            images=[o[0] for o in outcomes], timings=timings, random_weights=self.random_weights,
            prompt_truncated=caption.truncated,
        )

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
