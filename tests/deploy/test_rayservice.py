"""rayservice.yaml (KubeRay) cannot rot: it has the fields KubeRay's RayService CRD (ray.io/v1) requires,
its serveConfigV2 is serve_config.yaml's application config, and Ray Serve's own schema accepts it."""

from __future__ import annotations

import yaml

from tests.deploy.test_shipped_configs import ROOT


def rayservice() -> dict:
    return yaml.safe_load((ROOT / "rayservice.yaml").read_text())


def check_pod_template(template: dict, where: str) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where
    return containers


def test_rayservice_has_the_fields_the_crd_requires():
    """Required by KubeRay's RayService CRD: apiVersion/kind, spec.serveConfigV2 (a string),
    rayClusterConfig.headGroupSpec (rayStartParams, template) and each workerGroupSpec (groupName,
    replicas within minReplicas..maxReplicas, rayStartParams, template); workers ask for whole GPUs."""
    doc = rayservice()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    assert isinstance(spec["serveConfigV2"], str)
    cluster = spec["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # the CRD's map of strings
    check_pod_template(head["template"], "head")
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        containers = check_pod_template(group["template"], group["groupName"])
        gpus = int(containers[0]["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus == int(containers[0]["resources"]["requests"]["nvidia.com/gpu"]) == 8


def test_serve_config_v2_is_serve_config_yaml_and_validates_with_serve():
    from ray.serve.schema import ServeDeploySchema

    embedded = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(embedded)
