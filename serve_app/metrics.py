"""The Ingress's Prometheus metrics, through Ray Serve's metrics API (see deployments/runtime/metrics.py).

Recorded once per request from its `AccessRecord`; a streamed response also records its time to
first byte (the first step's event, sent before anything else) when its headers go out.
"""

from __future__ import annotations

from deployments.runtime.metrics import SECONDS_BOUNDARIES, counter, gauge, histogram
from serve_app.access_log import AccessRecord

# Upper bounds of the size classes, in pixels, named by the square side with that many pixels.
SIZE_CLASSES = ((512 * 512, "512"), (1024 * 1024, "1024"), (1536 * 1536, "1536"))
LATENCY_BOUNDARIES = SECONDS_BOUNDARIES + [300, 600]


def size_class(width: int | None, height: int | None) -> str:
    """A request's size as a few classes, so the latency histogram stays small: "none" before sizing."""
    if not width or not height:
        return "none"
    pixels = width * height
    return next((name for bound, name in SIZE_CLASSES if pixels <= bound), "2048")


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = counter("zimage_requests", "Requests by route, HTTP status and error code.",
                                ("route", "status", "code"))
        self.latency = histogram("zimage_request_seconds", "End-to-end request latency by size class.",
                                 LATENCY_BOUNDARIES, ("route", "size_class"))
        self.images = counter("zimage_images", "Images produced.", ("route",))
        self.in_flight = gauge("zimage_requests_in_flight", "Requests admitted and running through the stages.")
        self.first_byte = histogram("zimage_stream_first_byte_seconds",
                                    "Streamed responses: time until the headers and first event go out.",
                                    LATENCY_BOUNDARIES, ("route", "size_class"))

    def streamed(self, request: AccessRecord) -> None:
        self.first_byte.observe(request.seconds, {"route": request.route,
                                                  "size_class": size_class(request.width, request.height)})

    def record(self, request: AccessRecord) -> None:
        self.requests.inc(1, {"route": request.route, "status": str(request.status), "code": request.code or ""})
        self.latency.observe(request.seconds, {"route": request.route,
                                               "size_class": size_class(request.width, request.height)})
        if request.images:
            self.images.inc(request.images, {"route": request.route})
