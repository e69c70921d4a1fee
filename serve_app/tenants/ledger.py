"""Per-key admission on one Ingress replica: each key's places in flight and its images per minute.

A request of a key over its places, or with no image of its minute left, is refused with OpenAI's
429 `rate_limit_exceeded` before its body is read; the rest of its `n` images are taken once its
plan is known (a refusal then gives back the one taken first). Requests without a limit pass.

With several Ingress replicas (Serve's proxy spreads requests over them without looking at keys)
each holds its share of a key's limits: the limit over the running Ingress replicas, rounded up,
re-divided when their count changes (serve_app.readiness reads it from Serve's controller). So
across R replicas a key never holds more than R x ceil(L / R) < L + R places or images a minute;
and a key can be refused by one replica while another still has room, the 429 saying when this
replica's share frees.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from serve_app.errors import ApiError, bad_request
from serve_app.tenants.bucket import TokenBucket
from serve_app.tenants.headers import LimitState, openai_duration, rate_limit_headers
from serve_app.tenants.keys import Tenant

IN_FLIGHT = "in_flight"
IMAGES_PER_MINUTE = "images_per_minute"
CAPACITY = "capacity"  # the replica's own limit (api.max_inflight_requests): a 503, counted by key too
REASONS = (IN_FLIGHT, IMAGES_PER_MINUTE, CAPACITY)
MINUTE_S = 60.0


def rate_limited(message: str, wait_s: float) -> ApiError:
    return ApiError(429, f"{message} Please try again in {openai_duration(wait_s)}.", code="rate_limit_exceeded",
                    type_="rate_limit_exceeded", retry_after_s=wait_s)


@dataclass
class KeyUsage:
    """One key's state on this replica."""

    tickets: set[int] = field(default_factory=set)  # its admitted requests (serve_app.backlog's numbers)
    bucket: TokenBucket | None = None
    taken: collections.deque = field(default_factory=collections.deque)  # (time, images) of the last minute
    refused: collections.Counter = field(default_factory=collections.Counter)


class Ledger:
    def __init__(self, on_refusal: Callable[[str, str], None] = lambda name, reason: None,
                 first_free_s: Callable[[Iterable[int]], float] = lambda tickets: 1.0,
                 clock: Callable[[], float] = time.monotonic):
        """`on_refusal(key name, reason)`: the metrics' hook; `first_free_s(tickets)`: when the first
        of these admitted requests should finish (serve_app.backlog's estimate)."""
        self.on_refusal = on_refusal
        self.first_free_s = first_free_s
        self.clock = clock
        self.replicas = 1
        self._keys: dict[str, KeyUsage] = {}

    def share(self, limit: int | None) -> int | None:
        """This replica's share of a whole-server limit."""
        return None if limit is None else math.ceil(limit / max(1, self.replicas))

    def _usage(self, tenant: Tenant) -> KeyUsage:
        """The key's state, its bucket sized to this replica's current share of its limit."""
        usage = self._keys.setdefault(tenant.name, KeyUsage())
        capacity = self.share(tenant.images_per_minute)
        if capacity is None:
            usage.bucket = None
        elif usage.bucket is None:
            usage.bucket = TokenBucket(capacity, MINUTE_S, self.clock)
        elif usage.bucket.capacity != capacity:
            usage.bucket.resize(capacity)
        return usage

    def _count_refusal(self, tenant: Tenant, usage: KeyUsage, reason: str) -> None:
        usage.refused[reason] += 1
        self.on_refusal(tenant.name, reason)

    def _limit_text(self, limit: int, shared: int) -> str:
        return f"{shared}" if self.replicas == 1 else f"{shared} (this replica's share of {limit})"

    def check(self, tenant: Tenant) -> None:
        """Before the body: a 429 unless the key has a place and an image of its minute left."""
        if not tenant.limited:
            return
        usage = self._usage(tenant)
        places = self.share(tenant.max_in_flight)
        if places is not None and len(usage.tickets) >= places:
            self._count_refusal(tenant, usage, IN_FLIGHT)
            raise rate_limited(f"Rate limit reached for requests in flight (key {tenant.name!r}): Limit "
                               f"{self._limit_text(tenant.max_in_flight, places)}, In flight {len(usage.tickets)}.",
                               self.first_free_s(usage.tickets))
        if usage.bucket is not None and usage.bucket.available() < 1:
            raise self._images_refusal(tenant, usage, 1)

    def _images_refusal(self, tenant: Tenant, usage: KeyUsage, asked: int) -> ApiError:
        bucket = usage.bucket
        self._count_refusal(tenant, usage, IMAGES_PER_MINUTE)
        return rate_limited(f"Rate limit reached for images per minute (key {tenant.name!r}): Limit "
                            f"{self._limit_text(tenant.images_per_minute, bucket.capacity)}, Remaining "
                            f"{int(bucket.available())}, Requested {asked}.", bucket.wait_s(asked))

    def admit(self, tenant: Tenant, ticket: int) -> int:
        """Takes a place, and one image of the minute if the key has that limit (after `check`, with
        no await between). Returns the images taken: 0 or 1."""
        usage = self._usage(tenant)
        usage.tickets.add(ticket)
        return int(usage.bucket is not None and usage.bucket.take(1))

    def take_images(self, tenant: Tenant, n: int, held: int) -> int:
        """The rest of a planned request's `n` images (`held` were taken at admission). A 429 when the
        minute has not enough left (giving back what was held), a 400 when `n` is over the whole
        bucket. Returns the images now held: `n`, or 0 for a key without the limit."""
        usage = self._usage(tenant)
        bucket = usage.bucket
        if bucket is not None and n > bucket.capacity:
            bucket.give_back(held)
            limit = self._limit_text(tenant.images_per_minute, bucket.capacity)
            raise bad_request(f"n={n} is over this key's limit of {limit} images per minute: ask for fewer "
                              "images per request.", param="n")
        if bucket is not None and not bucket.take(n - held):
            bucket.give_back(held)
            raise self._images_refusal(tenant, usage, n)
        now = self.clock()
        usage.taken.append((now, n))
        while usage.taken[0][0] < now - MINUTE_S:
            usage.taken.popleft()
        return 0 if bucket is None else n

    def leave(self, tenant: Tenant, ticket: int, unplanned_images: int = 0) -> None:
        """The request ended; images held for a request that never got as far as its plan go back."""
        usage = self._usage(tenant)
        usage.tickets.discard(ticket)
        if unplanned_images and usage.bucket is not None:
            usage.bucket.give_back(unplanned_images)

    def refuse_capacity(self, tenant: Tenant) -> None:
        """The replica itself is full (a 503): counted for the key too."""
        self._count_refusal(tenant, self._usage(tenant), CAPACITY)

    def headers(self, tenant: Tenant) -> dict[str, str]:
        """The rate-limit headers (serve_app.tenants.headers) for an answer to `tenant`."""
        if not tenant.limited:
            return {}
        usage = self._usage(tenant)
        places = self.share(tenant.max_in_flight)
        place_state = None
        if places is not None:
            busy = len(usage.tickets)
            place_state = LimitState(places, places - busy, 0.0 if busy < places else self.first_free_s(usage.tickets))
        image_state = None
        if usage.bucket is not None:
            image_state = LimitState(usage.bucket.capacity, math.floor(usage.bucket.available() + 1e-9),
                                     usage.bucket.full_in_s())
        return rate_limit_headers(place_state, image_state)

    def usage(self, tenant: Tenant) -> dict:
        """The key's own counts on this replica (GET /v1/usage)."""
        usage = self._usage(tenant)
        now = self.clock()
        while usage.taken and usage.taken[0][0] < now - MINUTE_S:
            usage.taken.popleft()
        return {
            "key": tenant.name,
            "limits": {"max_in_flight": self.share(tenant.max_in_flight),
                       "images_per_minute": self.share(tenant.images_per_minute), "weight": tenant.weight},
            "in_flight": len(usage.tickets),
            "images_last_minute": sum(n for _, n in usage.taken),
            "images_remaining": None if usage.bucket is None else math.floor(usage.bucket.available() + 1e-9),
            "refused": {reason: usage.refused[reason] for reason in REASONS},
        }

    def forget_except(self, names: Iterable[str]) -> None:
        """After a config change: drops the state of keys no longer configured and not in flight."""
        keep = set(names)
        for name in [n for n, u in self._keys.items() if n not in keep and not u.tickets]:
            del self._keys[name]
