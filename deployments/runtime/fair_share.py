"""Weighted fair queueing over per-flow FIFO queues (start-time fair queueing). Plain Python, no Ray.

Each flow (a tenant: an API key's name) has its own FIFO queue and a weight. Every item has a cost
(megapixel-steps, the unit of deployments/denoiser/pending_work.py), and the flows are served in
order of virtual start tags: an item's start tag is its flow's last finish tag, and taking it moves
that flow's finish tag on by cost / weight. So over a long run the flows that always have work
waiting take cost in proportion to their weights, whatever their items' sizes, while a flow that
comes back after a pause starts at the current virtual time: it banks nothing for having been idle,
and a flow with nothing queued takes nothing. One flow's items keep their order.

`pop` may be told which items can be taken now (the Denoiser's step batch has room for some sizes
only): each flow then offers its first such item, and a skipped item keeps its place.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass
class _Waiting(Generic[Item]):
    item: Item
    cost: float


class FairShare(Generic[Item]):
    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[_Waiting[Item]]] = {}
        self._weights: dict[str, float] = {}
        self._finish: dict[str, float] = {}  # each flow's virtual finish tag, while it has work queued
        self._since: dict[str, int] = {}  # when each flow last became active: ties go to the earlier
        self._clock = 0.0  # virtual time: the start tag of the item taken last
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return sum(len(queue) for queue in list(self._queues.values()))

    def __bool__(self) -> bool:
        return bool(self._queues)

    def push(self, flow: str, item: Item, cost: float, weight: float = 1.0) -> None:
        """Queues `item` at the back of `flow`'s queue; `weight` (> 0) is the flow's from now on."""
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"flow {flow!r}: weight must be a positive finite number, got {weight}")
        if not (cost >= 0 and math.isfinite(cost)):
            raise ValueError(f"flow {flow!r}: cost must be a non-negative finite number, got {cost}")
        queue = self._queues.get(flow)
        if queue is None:
            queue = self._queues[flow] = collections.deque()
            self._finish[flow] = max(self._finish.get(flow, self._clock), self._clock)
            self._since[flow] = next(self._arrivals)
        queue.append(_Waiting(item, cost))
        self._weights[flow] = weight

    def charge(self, flow: str, cost: float, weight: float = 1.0) -> None:
        """Counts an item that was taken without waiting (there was room and no queue), as if it had
        been pushed and popped at once: what a flow takes unqueued still counts against its share."""
        start = max(self._finish.get(flow, self._clock), self._clock)
        self._finish[flow] = start + cost / weight
        self._clock = start

    def pop(self, takeable: Callable[[Item], bool] | None = None) -> Item | None:
        """The next item in fair order (of those `takeable` allows), removed; None when there is none."""
        best: tuple[tuple[float, float, int], str, int] | None = None
        for flow, queue in self._queues.items():
            index = next((i for i, waiting in enumerate(queue) if takeable is None or takeable(waiting.item)), None)
            if index is None:
                continue
            start = self._finish[flow]
            rank = (start, start + queue[index].cost / self._weights[flow], self._since[flow])
            if best is None or rank < best[0]:
                best = (rank, flow, index)
        if best is None:
            return None
        (start, finish, _), flow, index = best
        queue = self._queues[flow]
        waiting = queue[index]
        del queue[index]
        self._clock = max(self._clock, start)
        self._finish[flow] = finish
        if not queue:
            self._drop_flow(flow)
        for idle in [f for f, tag in self._finish.items() if f not in self._queues and tag <= self._clock]:
            del self._finish[idle]  # caught up with virtual time: a new start would begin at the clock anyway
        return waiting.item

    def remove(self, leaving: Callable[[Item], bool]) -> list[Item]:
        """Takes out every item for which `leaving` is true (its caller went away), in no fair order."""
        removed: list[_Waiting[Item]] = []
        for flow in list(self._queues):
            kept: collections.deque[_Waiting[Item]] = collections.deque()
            for waiting in self._queues[flow]:
                (removed if leaving(waiting.item) else kept).append(waiting)
            self._queues[flow] = kept
            if not kept:
                self._drop_flow(flow)
        return [waiting.item for waiting in removed]

    def items(self) -> list[Item]:
        """Every queued item (safe to call from another thread: each copy is one step)."""
        return [waiting.item for queue in list(self._queues.values()) for waiting in list(queue)]

    def flows(self) -> Iterator[tuple[str, int]]:
        """(flow, items queued) for each flow with work queued."""
        return ((flow, len(queue)) for flow, queue in list(self._queues.items()))

    def _drop_flow(self, flow: str) -> None:
        """An emptied flow. Its finish tag stays while it is ahead of virtual time (`pop` forgets it
        once the clock has caught up), so that going idle for a moment does not wipe out what it took."""
        del self._queues[flow]
        del self._since[flow]
        del self._weights[flow]
