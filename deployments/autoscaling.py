"""Autoscaling on the work waiting for the GPU: Ray Serve's custom policy hook for the Denoiser.

Ray Serve's default policy divides ongoing requests by `target_ongoing_requests`. For the Denoiser a
request is one image, but images differ a lot in cost (steps, size) and a replica's ongoing count is
capped by `max_ongoing_requests`, so the backlog piles up unseen at the callers' handles. This policy
reads what each replica reports through `Denoiser.record_autoscaling_stats()` (`pending_work`:
megapixel-steps of queued and running images, see deployments/denoiser/pending_work.py), adds the
requests queued at handles that no replica has taken yet, and asks for enough replicas that each
holds `target_work_per_replica`, but never more than the cluster can place: with
`replica_resources` (the deployment's `ray_actor_options` as Ray resources) the count is capped at
the replicas placed now plus as many more as the free resources hold (deployments/runtime/cluster_room.py),
plus `max_waiting_replicas` that may wait for a place.
Without the cap a backlog asked for 7 Denoisers on 2 GPUs, and 5 stayed pending for good, each
counted by Serve as coming.

Wired in serve_config.yaml (Ray Serve's own field; `policy_kwargs` go to the constructor):

    autoscaling_config:
      policy: {policy_function: "deployments.autoscaling:QueuedWorkPolicy",
               policy_kwargs: {target_work_per_replica: 32, replica_resources: {GPU: 0.6, CPU: 2}}}

Ray wraps the policy: min/max replicas, upscale/downscale delays and factors still apply.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from deployments.runtime.cluster_room import ClusterView, RayClusterView, placeable_replicas

logger = logging.getLogger("ray.serve")

WORK_METRIC = "pending_work"

# A replica of the shipped config runs up to 8 images at a time (max_batch_size 8); 8 images at
# 1024x1024 halfway through 8 steps is 8 x 4 = 32 megapixel-steps: a full, busy replica.
DEFAULT_TARGET_WORK = 32.0
# A request still queued at a handle is one image with unknown steps: count it as 8 steps at 1024x1024.
DEFAULT_WORK_PER_QUEUED_REQUEST = 8.0


def desired_replicas(replica_work: dict[Any, float], handle_queued: float, current: int, *,
                     target_work_per_replica: float = DEFAULT_TARGET_WORK,
                     work_per_queued_request: float = DEFAULT_WORK_PER_QUEUED_REQUEST) -> int:
    """Replicas that hold the waiting work at the target each. `replica_work` has one entry per
    running replica that has reported; with none reported yet, the current count stands."""
    if current > 0 and not replica_work:
        return current
    work = sum(replica_work.values()) + max(0.0, handle_queued) * work_per_queued_request
    return math.ceil(work / target_work_per_replica)


class QueuedWorkPolicy:
    """Ray Serve custom autoscaling policy (class form: built once with `policy_kwargs`, called
    every control-loop tick with an `AutoscalingContext`; returns (replicas, policy state))."""

    def __init__(self, target_work_per_replica: float = DEFAULT_TARGET_WORK,
                 work_per_queued_request: float = DEFAULT_WORK_PER_QUEUED_REQUEST,
                 replica_resources: Mapping[str, float] | None = None, max_waiting_replicas: int = 0,
                 cluster: ClusterView | None = None):
        """`replica_resources`: one replica's Ray resources (`num_gpus` as GPU, `num_cpus` as CPU,
        custom resources by name); None: no cap. `max_waiting_replicas`: how many replicas beyond
        what fits may be asked for, to wait for a place (a cluster that adds nodes on demand adds
        them for waiting replicas; on a fixed cluster they only wait). `cluster`: where free
        resources are read (tests)."""
        if target_work_per_replica <= 0 or work_per_queued_request < 0:
            raise ValueError("target_work_per_replica must be > 0 and work_per_queued_request >= 0")
        if replica_resources is not None and (
            not any(v > 0 for v in replica_resources.values()) or any(v < 0 for v in replica_resources.values())
        ):
            raise ValueError(f"replica_resources needs a positive amount and none negative: {replica_resources}")
        if max_waiting_replicas < 0:
            raise ValueError("max_waiting_replicas must be >= 0")
        self.target_work_per_replica = float(target_work_per_replica)
        self.work_per_queued_request = float(work_per_queued_request)
        self.replica_resources = None if replica_resources is None else {k: float(v) for k, v in
                                                                          replica_resources.items()}
        self.max_waiting_replicas = int(max_waiting_replicas)
        self.cluster = cluster
        self._warned = False

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        running = set(ctx.running_replicas)
        replica_work = {r: v for r, v in metrics.get(WORK_METRIC, {}).items() if r in running}
        replicas = desired_replicas(
            replica_work, ctx.total_queued_requests or 0.0, ctx.current_num_replicas,
            target_work_per_replica=self.target_work_per_replica,
            work_per_queued_request=self.work_per_queued_request,
        )
        state = dict(ctx.policy_state)
        state["pending_work"] = round(sum(replica_work.values()), 3)
        state["wanted_replicas"] = replicas
        if replicas > ctx.target_num_replicas and self.replica_resources is not None:
            placeable = self._placeable(ctx)
            if placeable is not None:
                state["placeable_replicas"] = placeable
                # Never below the running count or the current target: the cap only stops asking
                # for more than fits, it does not take back what was asked (downscaling is the
                # work signal's, under Serve's downscale delay).
                replicas = max(min(replicas, placeable), ctx.current_num_replicas, ctx.target_num_replicas)
        return replicas, state

    def _placeable(self, ctx) -> int | None:
        """Replicas this deployment can have placed, or None when the cluster cannot be read."""
        if self.cluster is None:
            self.cluster = RayClusterView()
        try:
            snapshot = self.cluster.snapshot(ctx.deployment_id.to_replica_actor_class_name())
        except Exception as exc:  # never let a failed read stop autoscaling: scale uncapped
            if not self._warned:
                self._warned = True
                logger.warning("could not read the cluster's free resources; not capping: %s", exc)
            return None
        return placeable_replicas(snapshot, self.replica_resources, self.max_waiting_replicas)
