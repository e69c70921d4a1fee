"""Autoscaling on the work waiting for the GPU: Ray Serve's custom policy hook for the Denoiser.

Ray Serve's default policy divides ongoing requests by `target_ongoing_requests`. For the Denoiser a
request is one image, but images differ a lot in cost (steps, size) and a replica's ongoing count is
capped by `max_ongoing_requests`, so the backlog piles up unseen at the callers' handles. This policy
reads what each replica reports through `Denoiser.record_autoscaling_stats()` (`pending_work`:
megapixel-steps of queued and running images, see deployments/core/pending_work.py), adds the
requests queued at handles that no replica has taken yet, and asks for enough replicas that each
holds `target_work_per_replica`.

Wired in serve_config.yaml (Ray Serve's own field; `policy_kwargs` go to the constructor):

    autoscaling_config:
      policy: {policy_function: "deployments.autoscaling:QueuedWorkPolicy",
               policy_kwargs: {target_work_per_replica: 32}}

Ray wraps the policy: min/max replicas, upscale/downscale delays and factors still apply.
"""

from __future__ import annotations

import math
from typing import Any

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
                 work_per_queued_request: float = DEFAULT_WORK_PER_QUEUED_REQUEST):
        if target_work_per_replica <= 0 or work_per_queued_request < 0:
            raise ValueError("target_work_per_replica must be > 0 and work_per_queued_request >= 0")
        self.target_work_per_replica = float(target_work_per_replica)
        self.work_per_queued_request = float(work_per_queued_request)

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
        return replicas, state
