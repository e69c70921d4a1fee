"""`stream: true` end to end: raw server-sent events, the official openai client on both routes (by
default exactly OpenAI's event types; `zimage.progress` when asked for), a client that goes away
mid-stream, and requests that cannot start."""

from __future__ import annotations

import io
import json
import time
import uuid

import httpx
import numpy as np
import openai
import pytest
from openai.types import (
    ImageEditCompletedEvent,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenPartialImageEvent,
)
from PIL import Image

from tests.integration.conftest import decode_png

pytestmark = pytest.mark.integration

FOX = {"prompt": "a red fox in fresh snow", "size": "512x512", "num_inference_steps": 4, "seed": 21}


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream body, parsed by the format's rules."""
    events, name, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            events.append((name, json.loads("\n".join(data))))
            name, data = None, []
    return events


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_png(b64))


def test_a_streamed_generation_sends_steps_partials_then_the_image_unstreamed_gives(served, http):
    request_id = f"stream-{uuid.uuid4().hex[:12]}"
    body = {**FOX, "stream": True, "partial_images": 2, "stream_progress": True}
    with http.stream("POST", "/v1/images/generations", json=body,
                     headers={"X-Request-ID": request_id}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert all(name == data["type"] for name, data in events)
    types = [data["type"] for _, data in events]
    assert types == ["zimage.progress", "image_generation.partial_image", "zimage.progress", "zimage.progress",
                     "image_generation.partial_image", "zimage.progress",
                     "image_generation.completed"], types  # previews after steps 1 and 3 of 4 (preview_steps)
    progress = [data for _, data in events if data["type"] == "zimage.progress"]
    assert [(p["step"], p["steps"]) for p in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(a["elapsed"] <= b["elapsed"] for a, b in zip(progress, progress[1:]))
    partials = [data for _, data in events if data["type"].endswith("partial_image")]
    assert [p["partial_image_index"] for p in partials] == [0, 1]
    for partial in partials:  # exactly the client's type; the preview is half the side
        assert ImageGenPartialImageEvent.model_validate(partial).size == "512x512"
        assert decode_png(partial["b64_json"]).size == (256, 256)
    completed = ImageGenCompletedEvent.model_validate(events[-1][1])
    assert completed.usage.output_tokens == 32 * 32 and completed.usage.input_tokens_details.text_tokens > 0
    assert events[-1][1]["seed"] == 21
    assert events[-1][1]["speed"]["denoiser"] == "float32, eager on cpu"  # what ran, as unstreamed
    assert not np.array_equal(pixels(partials[0]["b64_json"]), pixels(partials[1]["b64_json"]))

    unstreamed = http.post("/v1/images/generations", json=FOX).json()["data"][0]["b64_json"]
    assert np.array_equal(pixels(completed.b64_json), pixels(unstreamed))

    # The stream's access line counts its image and has the stages' timings, as an unstreamed one does.
    [line] = served.access_lines(request_id)
    fields = dict(part.split("=", 1) for part in line.split(" access ", 1)[1].split() if "=" in part)
    assert (fields["status"], fields["images"], fields["size"], fields["steps"]) == ("200", "1", "512x512", "4")
    sent = events[-1][1]["timings"]
    for name in ("total_ms", "encode_ms", "denoise_ms", "denoise_queue_ms", "decode_ms", "output_encode_ms"):
        assert float(fields[name]) == pytest.approx(sent[name], abs=0.01), name


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    gradient = np.linspace(0, 255, width * height * 3).astype(np.uint8).reshape(height, width, 3)
    Image.fromarray(gradient).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_official_client_streams_generations_and_edits(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)
    extra = {"seed": 5, "num_inference_steps": 3}
    stream = client.images.generate(prompt="a koi pond", size="512x512", stream=True, partial_images=2,
                                    extra_body=extra)
    events = list(stream)  # the default: OpenAI's event types and nothing else
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [type(e) for e in events] == [ImageGenPartialImageEvent] * 2 + [ImageGenCompletedEvent]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]

    upload = _png(640, 512)
    stream = client.images.edit(image=("in.png", upload, "image/png"), prompt="the same, at night", stream=True,
                                partial_images=1, extra_body={**extra, "strength": 1.0, "stream_progress": True})
    events = list(stream)
    progress = [e for e in events if e.type == "zimage.progress"]  # asked for: parsed, with the type kept
    assert [e.model_extra["step"] for e in progress] == [1, 2, 3]
    partials = [e for e in events if e.type == "image_edit.partial_image"]
    assert len(partials) == 1 and isinstance(partials[0], ImageEditPartialImageEvent)
    completed = events[-1]
    assert isinstance(completed, ImageEditCompletedEvent) and completed.size == "640x512"
    assert completed.usage.input_tokens_details.image_tokens == 40 * 32
    unstreamed = client.images.edit(image=("in.png", upload, "image/png"), prompt="the same, at night",
                                    extra_body={**extra, "strength": 1.0})
    assert np.array_equal(pixels(completed.b64_json), pixels(unstreamed.data[0].b64_json))


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"size": "500x500"}, "size"), ({"n": 2}, "n"), ({"partial_images": 4}, "partial_images"),
     ({"style": "no such style"}, "style"), ({"stream": False, "stream_progress": True}, "stream_progress")],
)
def test_a_stream_that_cannot_start_gets_a_json_error(http, fields, param):
    response = http.post("/v1/images/generations", json={**FOX, "stream": True, **fields})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["param"] == param


def _image_steps(stats: dict) -> int:
    return stats["methods"].get("step", {}).get("items", 0)


def test_a_client_that_leaves_a_stream_has_its_job_dropped_at_the_next_step(served, http):
    before = served.stats("Denoiser")
    body = {"prompt": "a lighthouse in a storm", "size": "1024x1024", "num_inference_steps": 16, "stream": True,
            "stream_progress": True}
    with http.stream("POST", "/v1/images/generations", json=body) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first == "event: zimage.progress"
    # the connection is closed here, after the first step
    deadline = time.monotonic() + 30
    while (after := served.stats("Denoiser"))["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, "the Denoiser never dropped the abandoned job"
        time.sleep(0.2)
    steps = _image_steps(after)
    time.sleep(1.0)  # had the job gone on, it would step on meanwhile
    assert _image_steps(served.stats("Denoiser")) == steps
    assert steps - _image_steps(before) < 16
