"""`stream: true` as server-sent events, in the shape of OpenAI's images API.

A streamed request sends `event: <type>` / `data: <json>` pairs:

    <kind>.partial_image           (`partial_images` of them, 0..3, spread over the steps)
    <kind>.completed               (the image, pixel for pixel what the same request gives unstreamed)
    zimage.progress                (only when the request sets `stream_progress`: after every
                                    denoising step, with step, steps, elapsed)

where <kind> is `image_generation` or `image_edit`. By default a stream carries exactly OpenAI's
event types, so a typed client that matches them exhaustively meets nothing else; our extension
event comes only when asked for. (The Python client passes an unknown type through, as an object
whose `type` is `zimage.progress`.)

Images travel as `b64_json`. With `response_format: "url"` the partial images still do (previews,
small, shown as they come and never fetched again, as OpenAI's stream sends them), and the completed
event carries `url` instead of `b64_json`: the image is stored before that event is sent, so a store
failure is an `error` event and no URL to a missing image goes out.

Errors: anything that fails before the first step is done gets the usual JSON error and status (the
Ingress waits for the first step before it sends headers). A failure after that is sent as one
`error` event, `{"type": "error", "error": {message, type, param, code}}` (the openai client raises it
as an `APIError`), and the stream closes.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Literal

from pydantic import BaseModel

from deployments.geometry import image_tokens
from serve_app.errors import api_error_for, error_info
from serve_app.pipeline import RequestPlan
from serve_app.protocol import (
    ImageCompletedEvent,
    ImageOptions,
    ImagePartialEvent,
    ImageResult,
    PartialImage,
    ProgressEvent,
    StepDone,
    StreamErrorEvent,
    StreamUsage,
)

StreamKind = Literal["image_generation", "image_edit"]
StreamItem = StepDone | PartialImage | ImageResult
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sse(event: BaseModel, exclude: set[str] | None = None) -> bytes:
    return f"event: {event.type}\ndata: {event.model_dump_json(exclude=exclude)}\n\n".encode()


class StreamEvents:
    """Turns a streamed run's items into the wire events of one request."""

    def __init__(self, kind: StreamKind, req: ImageOptions, plan: RequestPlan):
        self.kind = kind
        self.plan = plan
        self.progress = bool(req.stream_progress)
        self.settings = dict(
            size=f"{plan.width}x{plan.height}",
            quality=req.quality if req.quality in ("low", "medium", "high") else "auto",
            background=req.background or "auto",
            output_format=plan.output_format,
        )

    def encode(self, item: StreamItem) -> bytes:
        """The item's event; a step is an empty chunk unless the request asked for progress."""
        if isinstance(item, StepDone):
            if not self.progress:
                return b""
            return sse(ProgressEvent(step=item.step, steps=item.steps, elapsed=round(item.elapsed_s, 3)))
        created = int(time.time())
        if isinstance(item, PartialImage):
            return sse(ImagePartialEvent(type=f"{self.kind}.partial_image", b64_json=_b64(item.data),
                                         created_at=created, partial_image_index=item.index, **self.settings),
                       exclude={"url"})
        image = item.images[0]
        reference = {"url": image.url} if image.url else {"b64_json": _b64(image.data)}
        return sse(ImageCompletedEvent(
            type=f"{self.kind}.completed", created_at=created, **reference,
            usage=self.usage(item.prompt_tokens), seed=image.seed, revised_prompt=image.revised_prompt,
            timings=item.timings, random_weights=item.random_weights, speed=item.speed,
            loras=list(image.loras) or None, **self.settings,
        ), exclude={"b64_json"} if image.url else {"url"})

    def usage(self, text_tokens: int) -> StreamUsage:
        """DiT tokens: the caption's, the upload's patches (edits) and the output's patches."""
        output = image_tokens(self.plan.width, self.plan.height)
        upload = output if self.plan.init_image is not None else 0
        details = StreamUsage.InputDetails(image_tokens=upload, text_tokens=text_tokens)
        return StreamUsage(input_tokens=upload + text_tokens, input_tokens_details=details, output_tokens=output,
                           total_tokens=upload + text_tokens + output)


async def sse_body(first: StreamItem, rest: AsyncIterator[StreamItem], events: StreamEvents) -> AsyncIterator[bytes]:
    """The response body: `first` (already received, so that earlier failures were plain JSON errors),
    then the rest; a failure becomes an `error` event and ends the stream. Empty chunks are not sent."""
    if chunk := events.encode(first):
        yield chunk
    try:
        async for item in rest:
            chunk = events.encode(item) if isinstance(item, StepDone) else await asyncio.to_thread(events.encode, item)
            if chunk:
                yield chunk
    except Exception as exc:
        yield sse(StreamErrorEvent(error=error_info(api_error_for(exc))))
