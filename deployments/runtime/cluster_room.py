"""How many more replicas of a deployment the cluster can place: its free resources, node by node.

Read by the autoscaling policy (deployments/autoscaling.py), which runs inside Serve's controller, so
it can ask Ray's GCS directly. Ray Serve's `AutoscalingContext` carries neither the replicas' resource
request nor the cluster's free resources: the request comes from `policy_kwargs` (serve_config.yaml
keeps it beside the deployment's `ray_actor_options`; a test checks that they agree).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

EPS = 1e-6


@dataclass(frozen=True)
class ClusterSnapshot:
    free_per_node: tuple[Mapping[str, float], ...]
    total_per_node: tuple[Mapping[str, float], ...]
    placed: int  # the deployment's replica actors holding their resources (starting or running)


class ClusterView(Protocol):
    def snapshot(self, replica_class_name: str) -> ClusterSnapshot:
        """Free and total resources per node, and the placed actors of that class."""


def fits_on_node(free: Mapping[str, float], request: Mapping[str, float]) -> int:
    """Replicas of `request` that one node's free resources hold (a replica lives on one node)."""
    counts = [math.floor(free.get(name, 0.0) / amount + EPS) for name, amount in request.items() if amount > 0]
    return max(0, min(counts)) if counts else 0


def packing_limit(total_per_node: Iterable[Mapping[str, float]], request: Mapping[str, float]) -> int | None:
    """At most this many replicas in all, however free the GPUs: a fraction of a GPU never spans two
    GPUs, so a node of n GPUs holds n x floor(1 / share) replicas of a share under one (the free GPU
    total of a node, 0.4 + 0.4, would say one more fits where none does). None without a GPU share."""
    share = request.get("GPU", 0.0)
    if share <= 0:
        return None
    limit = 0
    for node in total_per_node:
        gpus = math.floor(node.get("GPU", 0.0) + EPS)
        limit += gpus * math.floor(1 / share + EPS) if share < 1 else gpus // math.ceil(share - EPS)
    return limit


def placeable_replicas(snapshot: ClusterSnapshot, request: Mapping[str, float], waiting: int = 0) -> int:
    """Replicas the deployment can have: those placed now plus as many more as the free resources
    hold (replicas asked for and not placed yet will take that room), plus `waiting` that may wait
    for a place (a waiting replica is what asks a cluster autoscaler for another node)."""
    room = sum(fits_on_node(free, request) for free in snapshot.free_per_node)
    placeable = snapshot.placed + room
    limit = packing_limit(snapshot.total_per_node, request)
    return (placeable if limit is None else min(placeable, limit)) + waiting


class RayClusterView:
    """Ray's GCS, read at most once per `ttl_s` (the controller ticks ten times a second)."""

    def __init__(self, ttl_s: float = 1.0):
        self.ttl_s = ttl_s
        self._cached: tuple[float, str, ClusterSnapshot] | None = None

    def snapshot(self, replica_class_name: str) -> ClusterSnapshot:
        now = time.monotonic()
        if self._cached and self._cached[1] == replica_class_name and now - self._cached[0] < self.ttl_s:
            return self._cached[2]
        from ray._private import state

        alive = state.actors(actor_state_name="ALIVE").values()  # placed: its resources are held
        snapshot = ClusterSnapshot(
            free_per_node=tuple(state.available_resources_per_node().values()),
            total_per_node=tuple(state.total_resources_per_node().values()),
            placed=sum(actor["ActorClassName"] == replica_class_name for actor in alive),
        )
        self._cached = (now, replica_class_name, snapshot)
        return snapshot
