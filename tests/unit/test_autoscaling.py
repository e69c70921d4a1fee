"""The Denoiser's autoscaling signal and policy: waiting work in megapixel-steps, turned into replicas
by the policy Ray Serve runs from serve_config.yaml (real AutoscalingContext and AutoscalingConfig),
never more than the cluster's free resources place."""

from __future__ import annotations

import asyncio

import pytest
import torch
import yaml

from deployments.autoscaling import QueuedWorkPolicy, desired_replicas
from deployments.runtime.cluster_room import ClusterSnapshot, fits_on_node, packing_limit, placeable_replicas
from deployments.contracts import DenoiseJob, LatentPosterior
from deployments.denoiser.pending_work import job_steps, measure
from deployments.denoiser.scheduling import ContinuousBatcher
from tests.deploy.test_shipped_configs import ROOT


def context(work_by_replica: dict[str, float], handle_queued: float = 0.0, replicas: int | None = None,
            target: int | None = None):
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    deployment = DeploymentID(name="Denoiser", app_name="zimage")
    ids = {name: ReplicaID(name, deployment) for name in work_by_replica}
    running = list(ids.values()) if replicas is None else [ReplicaID(f"r{i}", deployment) for i in range(replicas)]
    return AutoscalingContext(
        deployment_id=deployment, deployment_name="Denoiser", app_name="zimage",
        current_num_replicas=len(running), target_num_replicas=len(running) if target is None else target,
        running_replicas=running,
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
    # a node with room for more: the cap must not bind (without this, a Ray instance another test left
    # running in this process would be read, and its CPU-only node caps the Denoiser at what waits)
    roomy = {"GPU": 8.0, "CPU": 64.0}
    policy.cluster = type("Roomy", (), {"snapshot": lambda self, name: ClusterSnapshot((roomy,), (roomy,), 0)})()
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


DENOISER = {"GPU": 0.6, "CPU": 2.0}


class FakeCluster:
    """A ClusterView of fixed numbers; records what it was asked."""

    def __init__(self, free: list[dict[str, float]], total: list[dict[str, float]], placed: int):
        self.value = ClusterSnapshot(tuple(free), tuple(total), placed)
        self.asked: list[str] = []

    def snapshot(self, replica_class_name: str) -> ClusterSnapshot:
        self.asked.append(replica_class_name)
        return self.value


def two_gpu_node(free_gpu: float) -> FakeCluster:
    """One node of 2 GPUs and 32 CPUs holding one Denoiser (and what else took `2 - free_gpu`)."""
    return FakeCluster([{"GPU": free_gpu, "CPU": 20.0}], [{"GPU": 2.0, "CPU": 32.0}], placed=1)


def test_room_is_counted_node_by_node_and_gpu_by_gpu():
    assert fits_on_node({"GPU": 1.05, "CPU": 20}, DENOISER) == 1
    assert fits_on_node({"GPU": 1.05, "CPU": 1}, DENOISER) == 0  # the CPUs are the limit
    assert fits_on_node({"GPU": 4.0, "CPU": 64}, {**DENOISER, "denoiser_node": 1}) == 0  # no such resource here
    assert fits_on_node({"GPU": 1.8, "CPU": 64}, {"GPU": 0.6}) == 3  # 0.6 x 3 = 1.8 exactly
    # Two GPUs with a Denoiser each have 0.4 + 0.4 free: the total says one more fits, the GPUs say none.
    two_full = ClusterSnapshot(({"GPU": 0.8, "CPU": 28},), ({"GPU": 2.0, "CPU": 32},), placed=2)
    assert packing_limit(two_full.total_per_node, DENOISER) == 2
    assert placeable_replicas(two_full, DENOISER) == 2
    assert placeable_replicas(two_full, DENOISER, waiting=1) == 3
    eight = ({"GPU": 8.0},)
    assert packing_limit(eight, {"GPU": 0.25}) == 32 and packing_limit(eight, {"GPU": 2}) == 4
    assert packing_limit(eight, {"CPU": 1}) is None


def test_policy_asks_for_no_more_replicas_than_the_cluster_places():
    """The last round's case: a backlog asked for 7 Denoisers on 2 GPUs. One runs on GPU 0 with a text
    encoder and a decoder (0.95 taken): GPU 1 holds one more, and that is what the policy asks for."""
    cluster = two_gpu_node(free_gpu=1.05)
    policy = QueuedWorkPolicy(target_work_per_replica=32, replica_resources=DENOISER, cluster=cluster)
    replicas, state = policy(context({"a": 224.0}))
    assert replicas == 2 and state["wanted_replicas"] == 7 and state["placeable_replicas"] == 2
    assert cluster.asked == ["ServeReplica:zimage:Denoiser"]  # the replica actors' class in Ray
    waiting = QueuedWorkPolicy(target_work_per_replica=32, replica_resources=DENOISER, max_waiting_replicas=1,
                               cluster=cluster)
    assert waiting(context({"a": 224.0}))[0] == 3  # one more may wait: what asks for another node
    assert policy(context({"a": 40.0}))[0] == 2  # wanting no more than fits: not capped


def test_the_cap_never_takes_back_what_was_asked_and_is_read_only_to_scale_up():
    full = two_gpu_node(free_gpu=0.05)
    policy = QueuedWorkPolicy(target_work_per_replica=32, replica_resources=DENOISER, cluster=full)
    assert policy(context({"a": 224.0}, target=2))[0] == 2  # one starting, nothing free: hold, not 1
    assert policy(context({"a": 30.0}, target=1))[0] == 1
    assert policy(context({"a": 0.0}, target=2))[0] == 0  # scaling down is the work signal's alone
    assert len(full.asked) == 1  # only the tick that wanted more than its target read the cluster
    assert QueuedWorkPolicy(target_work_per_replica=32)(context({"a": 224.0}))[0] == 7  # no resources: no cap


def test_a_cluster_that_cannot_be_read_leaves_the_policy_uncapped():
    class Broken:
        def snapshot(self, replica_class_name: str) -> ClusterSnapshot:
            raise ConnectionError("GCS unavailable")

    policy = QueuedWorkPolicy(target_work_per_replica=32, replica_resources=DENOISER, cluster=Broken())
    replicas, state = policy(context({"a": 224.0}))
    assert replicas == 7 and "placeable_replicas" not in state
    with pytest.raises(ValueError):
        QueuedWorkPolicy(replica_resources={"GPU": 0})
    with pytest.raises(ValueError):
        QueuedWorkPolicy(replica_resources=DENOISER, max_waiting_replicas=-1)


def test_the_policys_replica_resources_are_the_denoisers_ray_actor_options():
    """serve_config.yaml states the Denoiser's resources twice (Serve does not hand them to a policy)."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.config import AutoscalingConfig

    from deployments.denoiser.deployment import Denoiser

    app = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    entry = next(d for d in app["deployments"] if d["name"] == "Denoiser")
    options = entry["ray_actor_options"]
    as_resources = {"GPU": options.get("num_gpus", 0), "CPU": options.get("num_cpus", 1),
                    **options.get("resources", {})}
    policy = _resolve_policy_callable(AutoscalingConfig(**entry["autoscaling_config"]).policy)
    assert policy.replica_resources == {k: float(v) for k, v in as_resources.items() if v}
    defaults = Denoiser.ray_actor_options  # the stage's own default share is the same GPU share
    assert defaults["num_gpus"] == options["num_gpus"]
