"""OpenAI's rate-limit headers, and the images pair of our own, on every answer to a limited key.

OpenAI's are per requests and tokens; here the requests limit is the key's places in flight and the
second limit is images per minute:

    x-ratelimit-limit-requests      the key's places in flight on this Ingress replica
    x-ratelimit-remaining-requests  places free now
    x-ratelimit-reset-requests      until a place frees (estimated; 0s while one is free)
    x-ratelimit-limit-images        the key's images per minute on this Ingress replica
    x-ratelimit-remaining-images    images it may ask for now
    x-ratelimit-reset-images        until its minute is whole again

Durations are written as OpenAI writes them (`20ms`, `1.5s`, `6m0s`). A limit the key does not have
sends none of its three headers; a key without limits gets none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def openai_duration(seconds: float) -> str:
    """`20ms`, `1.5s`, `6m0s`: how OpenAI writes `x-ratelimit-reset-*`."""
    if not math.isfinite(seconds):
        seconds = 0.0
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{text}s" if minutes else f"{text}s"


@dataclass(frozen=True)
class LimitState:
    """One limit of one key on this replica, as the headers tell it."""

    limit: int
    remaining: int
    reset_s: float


def rate_limit_headers(places: LimitState | None, images: LimitState | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for suffix, state in (("requests", places), ("images", images)):
        if state is not None:
            headers[f"x-ratelimit-limit-{suffix}"] = str(state.limit)
            headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, state.remaining))
            headers[f"x-ratelimit-reset-{suffix}"] = openai_duration(state.reset_s)
    return headers
