"""A token bucket: a key's images per minute.

The bucket holds up to `capacity` tokens (a minute's worth) and refills continuously at `capacity`
per `period_s`, so a key may spend its minute in a burst and then goes at the steady rate. A request
for n images takes n tokens, all or none.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, capacity: int, period_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        if capacity < 1 or not period_s > 0:
            raise ValueError("a bucket needs a capacity of at least 1 and a positive period")
        self.capacity = capacity
        self.period_s = period_s
        self.clock = clock
        self._tokens = float(capacity)
        self._updated = clock()

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.capacity / self.period_s

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def available(self) -> float:
        self._refill()
        return self._tokens

    def take(self, count: float) -> bool:
        """Takes `count` tokens if they are all there; False (and nothing taken) if not."""
        self._refill()
        if count > self._tokens + 1e-9:
            return False
        self._tokens -= count
        return True

    def give_back(self, count: float) -> None:
        self._refill()
        self._tokens = min(self.capacity, self._tokens + count)

    def wait_s(self, count: float) -> float:
        """Seconds until `count` tokens are there (0 now; infinite for more than the capacity)."""
        if count > self.capacity:
            return math.inf
        return max(0.0, (count - self.available()) / self.rate)

    def full_in_s(self) -> float:
        """Seconds until the bucket is full again: OpenAI's `x-ratelimit-reset-*`."""
        return max(0.0, (self.capacity - self.available()) / self.rate)

    def resize(self, capacity: int) -> None:
        """A new capacity (and with it the rate); what was used stays used, so a raised limit frees
        its difference at once and a lowered one keeps no more than the new capacity."""
        if capacity < 1:
            raise ValueError("a bucket needs a capacity of at least 1")
        used = self.capacity - self.available()
        self.capacity = capacity
        self._tokens = min(capacity, max(0.0, capacity - used))
