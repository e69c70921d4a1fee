"""The access-log line's fields, as Ray's JSON log formatter writes them, and the size classes."""

from __future__ import annotations

import json
import logging

from ray._common.formatters import JSONFormatter

from serve_app.access_log import LOG_PROMPTS_ENV, AccessRecord
from serve_app.metrics import size_class
from serve_app.protocol import Timings


def _json_line(record: AccessRecord) -> dict:
    log_record = logging.makeLogRecord({"msg": "access", "levelname": "INFO",
                                        "ray_serve_extra_fields": record.fields()})
    return json.loads(JSONFormatter().format(log_record))


def test_json_encoding_makes_each_field_a_key_and_leaves_prompts_out(monkeypatch):
    monkeypatch.delenv(LOG_PROMPTS_ENV, raising=False)
    record = AccessRecord("/v1/images/generations", status=400, code="invalid_value", width=512, height=768, n=2,
                          steps=4, style="Watercolor", prompt="a private prompt",
                          timings=Timings(total_ms=9.0, style_ms=0.1, encode_ms=2.0, denoise_ms=5.0, denoise_queue_ms=1.5,
                                          decode_ms=1.0, output_encode_ms=0.5))
    line = _json_line(record)
    assert (line["route"], line["status"], line["code"], line["size"]) == ("/v1/images/generations", 400,
                                                                           "invalid_value", "512x768")
    assert (line["n"], line["steps"], line["style"], line["denoise_queue_ms"]) == (2, 4, "Watercolor", 1.5)
    assert (line["total_ms"], line["image_encode_ms"]) == (9.0, 0.0)  # every field of the response's timings
    assert "prompt" not in line and "a private prompt" not in json.dumps(line)
    monkeypatch.setenv(LOG_PROMPTS_ENV, "1")
    assert _json_line(record)["prompt"] == "a private prompt"


def test_size_classes_bound_the_latency_histogram():
    assert [size_class(*s) for s in [(512, 512), (768, 512), (1024, 1024), (1536, 1536), (2048, 2048)]] == [
        "512", "1024", "1024", "1536", "2048"]
    assert size_class(None, None) == "none"


def test_every_http_request_gets_one_line_with_the_path_asked_for(caplog):
    """The middleware writes the line of each request whose route does not write its own: the page's,
    a 404, a 405 (with the path the client asked for, not a route prefix); a route that marks its
    request as logged gets none from it."""
    import logging

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from serve_app.access_log import LOGGED_BY_ROUTE, AccessLogMiddleware

    async def live(request):
        return JSONResponse({"status": "alive"})

    async def generations(request):  # as the image routes: it writes its own line
        request.scope["state"][LOGGED_BY_ROUTE] = True
        return JSONResponse({"data": []})

    app = Starlette(routes=[Route("/health/live", live), Route("/v1/images/generations", generations,
                                                                 methods=["POST"])])
    app.add_middleware(AccessLogMiddleware)

    with caplog.at_level(logging.INFO, logger="ray.serve"), TestClient(app) as client:
        assert client.get("/health/live").status_code == 200
        assert client.get("/nowhere").status_code == 404
        assert client.get("/v1/images/generations").status_code == 405
        assert client.post("/v1/images/generations").status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("access ")]
    assert len(lines) == 3, lines
    assert lines[0].startswith("access method=GET route=/health/live key=anonymous status=200 ")
    assert lines[1].startswith("access method=GET route=/nowhere key=anonymous status=404 ")
    assert lines[2].startswith("access method=GET route=/v1/images/generations key=anonymous status=405 ")
    assert all("bytes_out=" in line and "bytes_out=0" not in line for line in lines)
