"""One access-log line per request at the Ingress, and the request's ID from Serve's request context.

The image routes and the handle API write theirs with what the request asked and what it took
(`AccessRecord`); every other HTTP request (the page, health, listings, a 404 or 405) gets a short
line from `AccessLogMiddleware`, with the path the client asked for, not Serve's route prefix. With
Ray's own per-request lines off (serve_app.builder, serve_config.yaml's `logging_config`), this is
the one line a request leaves in the logs.

Serve's proxy takes a client's `X-Request-ID` (or makes one), returns it as a response header and
puts it in the request context, which deployment handles carry to every stage; Serve's logger adds
it to every replica log line made in that context. The line's fields also travel as
`ray_serve_extra_fields`, so with Serve's `logging_config: {encoding: JSON}` each field is a JSON key.
Prompts are logged only with `ZIMAGE_LOG_PROMPTS=1` in the Ingress replicas' environment.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from serve_app.protocol import ImageResult, Timings

if TYPE_CHECKING:
    from serve_app.tenants.keys import Tenant

logger = logging.getLogger("ray.serve")
Item = TypeVar("Item")

LOG_PROMPTS_ENV = "ZIMAGE_LOG_PROMPTS"


def current_request_id() -> str | None:
    """The ID Serve gave this request (the client's X-Request-ID when it sent one); None outside Serve."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or None


def log_prompts() -> bool:
    return os.environ.get(LOG_PROMPTS_ENV, "").strip().lower() in ("1", "true", "on", "yes")


@dataclass
class AccessRecord:
    """What one request did, filled in as it goes; `fields()` is the access-log line."""

    route: str
    method: str | None = None  # HTTP requests: GET, POST...; None for the handle API
    tenant: Tenant | None = None  # whose request: its name is the line's `key=` (never the key)
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    code: str | None = None
    width: int | None = None
    height: int | None = None
    n: int | None = None
    steps: int | None = None
    style: str | None = None
    prompt: str | None = None
    loras: str | None = None  # "name:scale,..." of the request's LoRA adapters
    images: int = 0
    timings: Timings | None = None  # a finished request's, as its response carries them
    bytes_out: int = 0

    def describe(self, plan: Any) -> None:
        """What was asked for, from the request's plan (serve_app.pipeline.RequestPlan)."""
        self.width, self.height, self.n, self.steps = plan.width, plan.height, plan.n, plan.steps
        self.style, self.prompt = plan.style, plan.prompt
        self.loras = ",".join(f"{lora.name}:{lora.scale:g}" for lora in plan.loras) or None

    def took(self, result: ImageResult) -> None:
        """What came back: the images and the stages' timings."""
        self.images, self.timings = len(result.images), result.timings

    @property
    def key(self) -> str:
        """The key's name; `anonymous` before (or without) a key."""
        return self.tenant.name if self.tenant is not None else "anonymous"

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def size(self) -> str | None:
        return f"{self.width}x{self.height}" if self.width and self.height else None

    def fields(self) -> dict[str, Any]:
        data = {
            "request_id": current_request_id(), "method": self.method, "route": self.route, "key": self.key, "status": self.status,
            "code": self.code,
            "size": self.size, "n": self.n, "steps": self.steps, "style": self.style, "loras": self.loras,
            "images": self.images,
            "duration_ms": round(self.seconds * 1000, 2), "bytes_out": self.bytes_out,
            **(self.timings.model_dump() if self.timings is not None else {}),
        }
        if log_prompts():
            data["prompt"] = self.prompt
        return data


async def noting(items: AsyncIterator[Item], record: AccessRecord) -> AsyncIterator[Item]:
    """A streamed run's items, passed on; its result is noted in `record` on the way, so that the
    line of a streamed request counts its image and has its timings as an unstreamed one does."""
    async for item in items:
        if isinstance(item, ImageResult):
            record.took(item)
        yield item


def write(record: AccessRecord) -> None:
    fields = record.fields()
    text = " ".join(f"{key}={value}" for key, value in fields.items() if key != "request_id")
    logger.info("access %s", text, extra={"ray_serve_extra_fields": fields})


LOGGED_BY_ROUTE = "access_logged"  # set in a request's scope state by a route that writes its own line


class AccessLogMiddleware:
    """ASGI middleware: the access line of each HTTP request whose route does not write its own (the
    image routes do, with their fields), written when the response has gone out."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = AccessRecord(scope["path"], method=scope["method"])  # the whole path, prefix included
        state = scope.setdefault("state", {})

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            elif message["type"] == "http.response.body":
                record.bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            if not state.get(LOGGED_BY_ROUTE):
                write(record)
