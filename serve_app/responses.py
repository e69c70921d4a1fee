"""How a request leaves the Ingress: its response encoded, and its end recorded once.

Images go out as OpenAI's images response (base64 in JSON, encoded off the event loop: megabytes)
or as server-sent events (serve_app.streaming); errors in the one error shape (serve_app.errors).
However a request ends, one access-log line and its metrics are written.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from starlette.responses import Response, StreamingResponse

from serve_app import access_log
from serve_app.access_log import AccessRecord
from serve_app.errors import ApiError, error_response
from serve_app.image_io import json_with_base64_images
from serve_app.metrics import IngressMetrics
from serve_app.protocol import ImageObject, ImageResult, ImagesResponse
from serve_app.streaming import SSE_HEADERS, StreamEvents, StreamItem, sse_body
from serve_app.tenants.keys import Tenant

RANDOM_WEIGHTS_HEADER = {"X-Random-Weights": "true"}


async def images_response(result: ImageResult, served_model_name: str) -> Response:
    """The OpenAI images response; base64 and JSON encoding run on a thread. Images already in the
    image store (`response_format: "url"`, serve_app.image_store.results) carry their `url` instead."""
    first = result.images[0]
    headers = RANDOM_WEIGHTS_HEADER if result.random_weights else None
    by_url = all(img.url for img in result.images)
    body = ImagesResponse(
        created=int(time.time()),
        data=[ImageObject(url=img.url, revised_prompt=img.revised_prompt, seed=img.seed, loras=list(img.loras) or None)
              if by_url else ImageObject(b64_json="", revised_prompt=img.revised_prompt, seed=img.seed,
                                         loras=list(img.loras) or None) for img in result.images],
        model=served_model_name,
        size=f"{first.width}x{first.height}",
        output_format=first.format,
        timings=result.timings,
        random_weights=result.random_weights,
        speed=result.speed,
    )
    if by_url:
        return Response(body.model_dump_json(exclude={"data": {"__all__": {"b64_json"}}}),
                        media_type="application/json", headers=headers)
    payload = body.model_dump(exclude={"data": {"__all__": {"url"}}})
    content = await asyncio.to_thread(json_with_base64_images, payload, [img.data for img in result.images])
    return Response(content, media_type="application/json", headers=headers)


class Responder:
    """Ends requests: records each one's outcome (access log, metrics) exactly once, gives every 503 a
    `Retry-After` from `retry_after` (seconds; serve_app.backlog's estimate), and every answer to a
    limited key its rate-limit headers from `rate_headers` (serve_app.tenants.headers)."""

    def __init__(self, metrics: IngressMetrics, retry_after: Callable[[], float],
                 rate_headers: Callable[[Tenant], dict[str, str]] = lambda tenant: {}) -> None:
        self.metrics = metrics
        self.retry_after = retry_after
        self.rate_headers = rate_headers

    def with_rate_headers(self, response: Response, tenant: Tenant | None) -> Response:
        if tenant is not None:
            response.headers.update(self.rate_headers(tenant))
        return response

    def with_retry_after(self, error: ApiError) -> ApiError:
        if error.status == 503 and error.retry_after_s is None:
            error.retry_after_s = self.retry_after()
        return error

    def finish(self, record: AccessRecord, status: int, code: str | None = None) -> None:
        """The request's access-log line and metrics, once, however it ended."""
        record.status, record.code = status, code
        access_log.write(record)
        self.metrics.record(record)

    def answered(self, record: AccessRecord, response: Response) -> Response:
        record.bytes_out = len(response.body)
        self.finish(record, response.status_code)
        return self.with_rate_headers(response, record.tenant)

    def failed(self, record: AccessRecord, error: ApiError) -> Response:
        response = error_response(self.with_retry_after(error))
        record.bytes_out = len(response.body)
        self.finish(record, error.status, error.code)
        return self.with_rate_headers(response, record.tenant)

    def stream(self, first: StreamItem, rest: AsyncIterator[StreamItem], events: StreamEvents,
               record: AccessRecord, random_weights: bool) -> StreamingResponse:
        """Server-sent events; `first` was awaited before the headers go out, so a request that could
        not start got a JSON error with its status instead."""
        self.metrics.streamed(record)
        headers = {**SSE_HEADERS, **(RANDOM_WEIGHTS_HEADER if random_weights else {}),
                   **(self.rate_headers(record.tenant) if record.tenant is not None else {})}
        body = self._logged(sse_body(first, rest, events), record)
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)

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
            self.finish(record, status, code)
