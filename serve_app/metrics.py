"""The Ingress's Prometheus metrics, through Ray Serve's metrics API (see deployments/runtime/metrics.py).

Recorded once per request from its `AccessRecord`; a streamed response also records its time to
first byte (the first step's event, sent before anything else) when its headers go out. The `key`
label is the key's name (`unnamed` for keys without one, `anonymous` where no key was given or
needed), so its values are bounded by the keys configured and never show a key or its digest.
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
        self.requests = counter("zimage_requests", "Requests by route, HTTP status, error code and key name.",
                                ("route", "status", "code", "key"))
        self.latency = histogram("zimage_request_seconds", "End-to-end request latency by size class and key name.",
                                 LATENCY_BOUNDARIES, ("route", "size_class", "key"))
        self.images = counter("zimage_images", "Images produced.", ("route",))
        self.in_flight = gauge("zimage_requests_in_flight", "Requests admitted and running through the stages.")
        self.first_byte = histogram("zimage_stream_first_byte_seconds",
                                    "Streamed responses: time until the headers and first event go out.",
                                    LATENCY_BOUNDARIES, ("route", "size_class"))
        self.refusals = counter("zimage_refusals", "Requests refused by key name and reason: in_flight and "
                                "images_per_minute (429, the key's limits), capacity (503, the replica's).",
                                ("key", "reason"))
        self.release_waiting = gauge("zimage_release_waiting",
                                     "Admitted requests waiting in the Ingress for their fair release, by key name.",
                                     ("key",))
        self.release_wait = histogram("zimage_release_wait_seconds",
                                      "Time an admitted request waited in the Ingress before its release, by key name.",
                                      SECONDS_BOUNDARIES, ("key",))
        self.released_images = gauge("zimage_released_images", "Images released past the Ingress (kind=in_flight) "
                                     "and the window they may fill (kind=window).", ("kind",))
        self.config_refused = gauge("zimage_ingress_config_refused",
                                    "1 while the last live config update was refused (the replica keeps its config).")

    def refused(self, key: str, reason: str) -> None:
        self.refusals.inc(1, {"key": key, "reason": reason})

    def released(self, key: str, seconds: float) -> None:
        self.release_wait.observe(seconds, {"key": key})

    def waiting(self, key: str, count: int) -> None:
        self.release_waiting.set(count, {"key": key})

    def streamed(self, request: AccessRecord) -> None:
        self.first_byte.observe(request.seconds, {"route": request.route,
                                                  "size_class": size_class(request.width, request.height)})

    def record(self, request: AccessRecord) -> None:
        self.requests.inc(1, {"route": request.route, "status": str(request.status), "code": request.code or "",
                              "key": request.key})
        self.latency.observe(request.seconds, {"route": request.route, "key": request.key,
                                               "size_class": size_class(request.width, request.height)})
        if request.images:
            self.images.inc(request.images, {"route": request.route})
