"""The plain diffusers server: the baseline that the served pipeline is measured against.

It is what a simple app does: one `ZImagePipeline` call per request, one request at a time (an
asyncio lock), the call in a worker thread so the event loop keeps answering. Same HTTP shape as the
real server (`POST /v1/images/generations`, OpenAI errors), so `benchmarks.loadgen` drives both.

    python -m benchmarks.baseline_server --model random --device cuda --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import logging
import secrets
import time
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from deployments.weights import loading
from deployments.geometry import parse_size, size_problem
from deployments.weights.model_source import RANDOM, ModelSource, resolve_model_source

logger = logging.getLogger("baseline_server")

DEFAULT_SIZE = "1024x1024"
DEFAULT_STEPS = 8
MAX_STEPS = 50
MAX_N = 10
MAX_PIXELS = 2048 * 2048
MAX_SEED = 2**63 - 1


class RequestError(Exception):
    """A client error, answered as a 400 in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


# ------------------------------------------------------------------------------------------ model


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype):
    """diffusers' own pipeline: from_pretrained for checkpoints, our loaders' modules for `random`."""
    from diffusers import ZImagePipeline

    source = resolve_model_source(model)
    if source.is_random:
        logger.warning("model %r has RANDOM weights: images carry no meaning", RANDOM)
        pipe = ZImagePipeline(
            scheduler=loading.load_scheduler(source),
            vae=loading.load_vae(source, device, dtype),
            text_encoder=loading.load_text_encoder(source, device, dtype, penultimate_only=False),
            tokenizer=loading.load_tokenizer(source),
            transformer=loading.load_transformer(source, device, dtype),
        )
    else:
        if source.random_weights:
            logger.warning("model %r has RANDOM weights: images carry no meaning", source.name)
        pipe = ZImagePipeline.from_pretrained(source.location, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, source


# ---------------------------------------------------------------------------------------- request


def parse_request(body: Any) -> dict[str, Any]:
    """Minimal checks, enough to refuse what the pipeline would choke on."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("prompt must be a non-empty string", "prompt")
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise RequestError(f"n must be an integer in 1..{MAX_N}", "n")
    size = body.get("size") or DEFAULT_SIZE
    try:
        width, height = parse_size(size if isinstance(size, str) else "")
    except ValueError:
        raise RequestError(f"size must be 'WIDTHxHEIGHT', got {size!r}", "size") from None
    problem = size_problem(width, height, MAX_PIXELS)
    if problem:
        raise RequestError(f"size {size!r} is not supported: {problem}", "size")
    if body.get("response_format", "b64_json") not in ("b64_json", None):
        raise RequestError("only response_format 'b64_json' is supported", "response_format")
    steps = body.get("num_inference_steps", DEFAULT_STEPS)
    steps = DEFAULT_STEPS if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise RequestError(f"num_inference_steps must be an integer in 1..{MAX_STEPS}", "num_inference_steps")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED - MAX_N:
        raise RequestError("seed must be a non-negative integer", "seed")
    return {"prompt": prompt, "n": n, "width": width, "height": height, "steps": steps, "seed": seed}


def _png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class BaselineServer:
    def __init__(self, pipe, source: ModelSource, device: torch.device):
        self.pipe = pipe
        self.source = source
        self.device = device
        self.lock = asyncio.Lock()

    def _generate(self, req: dict[str, Any]) -> list:
        # Image i of a request with seed s uses seed s + i, each from its own CPU generator.
        generators = [torch.Generator("cpu").manual_seed(req["seed"] + i) for i in range(req["n"])]
        with torch.inference_mode():
            out = self.pipe(
                prompt=req["prompt"],
                height=req["height"],
                width=req["width"],
                num_inference_steps=req["steps"],
                guidance_scale=0.0,
                num_images_per_prompt=req["n"],
                generator=generators,
                output_type="pil",
            )
        return out.images

    async def generations(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "the request body is not valid JSON")
        try:
            req = parse_request(body)
        except RequestError as exc:
            return error_response(400, exc.message, exc.param)
        try:
            async with self.lock:
                images = await asyncio.to_thread(self._generate, req)
            encoded = await asyncio.to_thread(lambda: [_png_b64(im) for im in images])
        except Exception as exc:  # the baseline reports, it does not recover
            logger.exception("generation failed")
            return error_response(500, f"generation failed: {type(exc).__name__}: {exc}")
        data = [
            {"b64_json": b64, "revised_prompt": req["prompt"], "seed": req["seed"] + i}
            for i, b64 in enumerate(encoded)
        ]
        return JSONResponse(
            {"created": int(time.time()), "data": data, "model": self.source.name,
             "random_weights": self.source.random_weights}
        )

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.source.name, "device": str(self.device)})


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


def build_app(server: BaselineServer) -> Starlette:
    routes = [
        Route("/v1/images/generations", server.generations, methods=["POST"]),
        Route("/health", server.health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Plain diffusers ZImagePipeline server (the baseline).")
    parser.add_argument("--model", default="tiny", help="'tiny', 'random', a hub id or a local directory")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = loading.resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    pipe, source = load_pipeline(args.model, device, dtype)
    logger.info("loaded %s on %s (%s) in %.1f s", source.name, device, dtype, time.perf_counter() - started)
    app = build_app(BaselineServer(pipe, source, device))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False)


if __name__ == "__main__":
    main()
