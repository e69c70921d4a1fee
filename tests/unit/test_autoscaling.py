"""The Denoiser's autoscaling signal and policy: waiting work in megapixel-steps, turned into replicas
by the policy Ray Serve runs from serve_config.yaml (real AutoscalingContext and AutoscalingConfig)."""

from __future__ import annotations

import asyncio

import pytest
import torch
import yaml

from deployments.autoscaling import QueuedWorkPolicy, desired_replicas
from deployments.core.contracts import DenoiseJob, LatentPosterior
from deployments.core.pending_work import job_steps, measure
from deployments.core.scheduling import ContinuousBatcher
from tests.deploy.test_shipped_configs import ROOT


def context(work_by_replica: dict[str, float], handle_queued: float = 0.0, replicas: int | None = None):
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    deployment = DeploymentID(name="Denoiser", app_name="zimage")
    ids = {name: ReplicaID(name, deployment) for name in work_by_replica}
    running = list(ids.values()) if replicas is None else [ReplicaID(f"r{i}", deployment) for i in range(replicas)]
    return AutoscalingContext(
        deployment_id=deployment, deployment_name="Denoiser", app_name="zimage",
        current_num_replicas=len(running), target_num_replicas=len(running), running_replicas=running,
        total_num_requests=lambda: 0.0, total_queued_requests=lambda: handle_queued,
        aggregated_metrics=lambda: {"pending_work": {ids[n]: v for n, v in work_by_replica.items()}},
        raw_metrics=None, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0,
        config=AutoscalingConfig(min_replicas=1, max_replicas=8),
    )


def job(width=1024, height=1024, steps=8, strength=1.0, edit=False) -> DenoiseJob:
    posterior = LatentPosterior(torch.zeros(1), torch.zeros(1), 0.0, 1.0) if edit else None
    return DenoiseJob(caption=torch.zeros(4, 8), width=width, height=height, steps=steps, seed=0,
                      init_posterior=posterior, strength=strength)


def test_work_counts_steps_left_weighted_by_pixels():
    assert job_steps(job(steps=8, strength=0.5, edit=True)) == 4  # an edit skips the noisiest steps
    work = measure([job(), job(2048, 2048, steps=4)], [(job(512, 512), 3)])
    assert (work.queued_images, work.running_images, work.queued_steps, work.running_steps_left) == (2, 1, 12, 3)
    assert work.work == pytest.approx(8 + 4 * 4 + 3 * 0.25)
    assert work.as_metrics()["pending_work"] == pytest.approx(24.75)


def test_policy_targets_work_per_replica():
    policy = QueuedWorkPolicy(target_work_per_replica=32)
    assert policy(context({"a": 100.0}))[0] == 4  # one busy replica with a backlog: ask for 4
    assert policy(context({"a": 20.0, "b": 10.0}))[0] == 1  # two with little work: one holds it
    assert policy(context({"a": 0.0}))[0] == 0  # idle: Ray's bounds keep min_replicas
    replicas, state = policy(context({"a": 16.0}, handle_queued=10))  # 10 images no replica took yet
    assert replicas == 3 and state["pending_work"] == 16.0  # 16 + 10 x 8 = 96 -> 3


def test_policy_keeps_the_count_until_replicas_report():
    assert QueuedWorkPolicy()(context({}, replicas=3))[0] == 3
    assert desired_replicas({}, handle_queued=4, current=0) == 1  # none running: queued work decides
    with pytest.raises(ValueError):
        QueuedWorkPolicy(target_work_per_replica=0)


def test_serve_config_wires_the_policy_for_the_denoiser():
    """serve_config.yaml's entry goes through Ray Serve's own AutoscalingConfig, which imports and
    serializes the policy as the controller does; the instance it builds acts on waiting work."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.config import AutoscalingConfig

    app = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    entry = next(d for d in app["deployments"] if d["name"] == "Denoiser")["autoscaling_config"]
    config = AutoscalingConfig(**entry)
    assert config.policy.policy_function == "deployments.autoscaling:QueuedWorkPolicy"
    policy = _resolve_policy_callable(config.policy)
    target = entry["policy"]["policy_kwargs"]["target_work_per_replica"]
    assert policy.target_work_per_replica == target
    assert policy(context({"a": 3 * target}))[0] == 3


def test_continuous_batcher_reports_queued_and_running_work(pipeline):
    """While one job runs (max batch 1), the other waits: the batcher's two views say so."""
    dim = pipeline.loop.transformer.config.cap_feat_dim
    first, second = (DenoiseJob(caption=torch.randn(5, dim), width=512, height=512, steps=s, seed=s) for s in (3, 2))
    seen = []
    batcher = ContinuousBatcher(pipeline.loop, max_batch_size=1,
                                record=lambda size, s: seen.append((batcher.queued_jobs(), batcher.running_jobs())))

    async def scenario():
        await asyncio.gather(batcher.submit(first), batcher.submit(second))

    asyncio.run(scenario())
    assert seen[0] == ([second], [(first, 2)])  # after the first job's first step: 2 of 3 left
    assert seen[-1] == ([], [(second, 0)])
    assert batcher.queued_jobs() == [] and batcher.running_jobs() == []
