"""The SSE body of a streamed request: exactly OpenAI's event types unless progress is asked for; a
failure after the stream started is one `error` event, last."""

from __future__ import annotations

import asyncio
import json

from serve_app.errors import ApiError
from serve_app.pipeline import RequestPlan
from serve_app.protocol import ImageGenerationRequest, StepDone
from serve_app.streaming import StreamEvents, sse_body


def _events(body: bytes) -> list[tuple[str, dict]]:
    events = []
    for block in body.decode().strip().split("\n\n"):
        name, data = (line.split(": ", 1)[1] for line in block.split("\n"))
        events.append((name, json.loads(data)))
    return events


def _run(failure: Exception, progress: bool = True) -> list[tuple[str, dict]]:
    req = ImageGenerationRequest(prompt="a fox", stream=True, stream_progress=progress)
    plan = RequestPlan(prompt="a fox", n=1, width=512, height=512, steps=4, seed=1, style=None, guidance_scale=0.0,
                       negative_prompt="", output_format="png", output_compression=None)

    async def rest():
        yield StepDone(2, 4, 0.2)
        raise failure

    async def body() -> bytes:
        return b"".join([chunk async for chunk in sse_body(StepDone(1, 4, 0.1), rest(), StreamEvents("image_generation", req, plan))])

    return _events(asyncio.run(body()))


def test_an_api_error_mid_stream_is_sent_as_an_error_event_in_openai_shape():
    events = _run(ApiError(503, "The request did not finish in time; retry shortly.", code="timeout"))
    assert [name for name, _ in events] == ["zimage.progress", "zimage.progress", "error"]
    assert [data["step"] for _, data in events[:2]] == [1, 2]
    assert events[-1][1] == {"type": "error", "error": {"message": "The request did not finish in time; retry shortly.",
                                                       "type": "server_overloaded", "param": None, "code": "timeout",
                                                       "request_id": None}}  # no Serve request here


def test_an_internal_failure_mid_stream_says_nothing_internal():
    events = _run(RuntimeError("CUDA error: secret detail"))
    assert events[-1][1]["error"]["code"] == "internal_error"
    assert "secret" not in json.dumps(events[-1][1])


def test_steps_send_nothing_unless_the_request_asks_for_progress():
    events = _run(ApiError(503, "The request did not finish in time; retry shortly.", code="timeout"), progress=False)
    assert [name for name, _ in events] == ["error"]
