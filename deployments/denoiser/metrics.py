"""The Denoiser's own metrics, beside the stage metrics every stage records (deployments.runtime.metrics)."""

from __future__ import annotations

from collections.abc import Sequence

from deployments.runtime.metrics import counter, gauge


class DenoiserMetrics:
    """The Denoiser's own: the active scheduling policy, expired jobs, and whether its batched graphs are
    compiled. Its image steps, per-step time, images per step, images running and dropped jobs are the
    stage metrics of method `step`."""

    def __init__(self, policies: Sequence[str]) -> None:
        self.policies = tuple(policies)
        self.policy = gauge("zimage_denoiser_scheduling_policy", "1 for the active scheduling policy.", ("policy",))
        self.expired = counter("zimage_denoiser_expired", "Jobs dropped because their request's deadline passed.")
        self.batched_ready = gauge("zimage_denoiser_batched_graphs_ready",
                                   "1 once the graphs of batches over one image are compiled; until then each "
                                   "image of a batch runs as its own forward.")

    def set_policy(self, active: str) -> None:
        for name in self.policies:
            self.policy.set(1.0 if name == active else 0.0, {"policy": name})
