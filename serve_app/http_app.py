"""The Ingress's FastAPI app: its error handlers, the page's static files and the OpenAPI bodies of
the image routes. The routes themselves are the Ingress's methods (serve_app.ingress).
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.staticfiles import StaticFiles

from serve_app.access_log import AccessLogMiddleware
from serve_app.errors import ApiError, api_error_for, error_response
from serve_app.protocol import ImageEditRequest

WEB_DIR = Path(__file__).parent / "web"  # the page: static files, no build step, nothing from the network
PAGE_BASE = '<base href="/">'  # index.html's; every URL in the page is relative to it

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


def page_html(prefix: str) -> str:
    """index.html with its `<base href>` at `prefix` (Serve's route prefix or a proxy's root_path, no
    trailing slash): the page's relative URLs (its files, the API) then resolve where the app is served."""
    html = (WEB_DIR / "index.html").read_text()
    return html.replace(PAGE_BASE, f'<base href="{escape(prefix)}/">', 1)


def json_schema_body(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def multipart_schema_body() -> dict:
    schema = ImageEditRequest.model_json_schema()
    schema["properties"]["image"] = {"type": "string", "format": "binary"}
    schema["properties"]["mask"] = {"type": "string", "format": "binary"}  # inpainting (serve_app.masks)
    schema["properties"]["control_image"] = {"type": "string", "format": "binary"}  # serve_app.control
    schema["required"] = ["image", "prompt"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


