"""The Denoiser's autoscaling signal on the served app: while images wait, `record_autoscaling_stats`
(Ray Serve's custom-metrics hook, read by deployments/autoscaling.py) reports them and their steps;
when they are done it reports nothing waiting. Each stage also reports its start, phase by phase."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from tests.integration.conftest import APP_NAME

pytestmark = pytest.mark.integration


def test_the_denoiser_reports_waiting_work_and_its_start_phases(served, http):
    from ray import serve

    denoiser = serve.get_deployment_handle("Denoiser", APP_NAME)
    body = {"prompt": "a lighthouse", "size": "512x512", "n": 3, "num_inference_steps": 6, "seed": 3}
    seen = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        response = pool.submit(http.post, "/v1/images/generations", json=body)
        deadline = time.monotonic() + 120
        while not response.done() and time.monotonic() < deadline:
            seen.append(denoiser.record_autoscaling_stats.remote().result(timeout_s=30))
            time.sleep(0.05)
        assert response.result().status_code == 200
    busy = [s for s in seen if s["queued_images"] + s["running_images"] > 0]
    assert busy, seen
    assert all(s["queued_images"] + s["running_images"] <= 3 for s in busy)
    assert all(s["pending_work"] == pytest.approx(0.25 * (s["queued_steps"] + s["running_steps_left"])) for s in busy)
    assert max(s["queued_steps"] + s["running_steps_left"] for s in busy) > 0
    after = denoiser.record_autoscaling_stats.remote().result(timeout_s=30)
    assert after == {"queued_images": 0, "running_images": 0, "queued_steps": 0, "running_steps_left": 0,
                     "pending_work": 0.0}
    stats = served.stats("Denoiser")
    assert stats["pending_work"] == after
    assert stats["start_phases"]["load_s"] > 0
    phases = stats["start_phases"]
    assert set(phases) == {"imports_s", "load_s", "random_init_s", "optimize_s", "compile_s", "compile_dynamo_s",
                           "warmup_s", "warmup_after_ready_s", "warmup_shapes_s", "ready_s", "process_s"}
    assert phases["imports_s"] > 0  # torch and the DiT's code: the shell's module imports them in the replica
    assert phases["random_init_s"] == 0.0  # tiny's weights are read from its checkpoint, not built
    assert phases["process_s"] >= phases["ready_s"] >= phases["load_s"] + phases["optimize_s"] + phases["warmup_s"]
    assert stats["state"] == "ready"
    assert stats["batched_graphs_ready"]  # nothing compiles on a CPU, so nothing is left for after ready


def test_the_policy_reads_the_denoisers_placed_replicas_and_the_free_resources_from_ray(served):
    """What the autoscaling policy's cap reads in Serve's controller, read here from the same GCS."""
    from ray.serve._private.common import DeploymentID

    from deployments.runtime.cluster_room import RayClusterView

    class_name = DeploymentID(name="Denoiser", app_name=APP_NAME).to_replica_actor_class_name()
    snapshot = RayClusterView().snapshot(class_name)
    assert snapshot.placed == 1  # the one Denoiser replica of the test app
    assert snapshot.free_per_node and all("CPU" in node for node in snapshot.total_per_node)
