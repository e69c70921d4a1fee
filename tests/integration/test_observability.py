"""Metrics, request IDs and access logs, checked by a real Prometheus scraping Ray's metrics agent.

Counters are shared with the other tests of the session, so each query is read when it has settled,
then again after known traffic, and must have moved by exactly what was sent.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

GEN = "/v1/images/generations"
SCRAPE_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("ZIMAGE_SKIP_PROMETHEUS") == "1":
            pytest.skip("ZIMAGE_SKIP_PROMETHEUS=1 and no prometheus binary")
        pytest.fail("prometheus is not installed (apt-get install prometheus); ZIMAGE_SKIP_PROMETHEUS=1 skips")
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: ray\n    static_configs: [{{targets: ['127.0.0.1:{served.metrics_port}']}}]\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "wb"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _ready(url):
            assert process.poll() is None, (work / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(prom: str, promql: str) -> float | None:
    """The query's single value, or None when it has no series."""
    response = httpx.get(f"{prom}/api/v1/query", params={"query": promql}, timeout=10)
    response.raise_for_status()
    result = response.json()["data"]["result"]
    assert len(result) <= 1, f"{promql} gave {len(result)} series; wrap it in sum()"
    return float(result[0]["value"][1]) if result else None


def settled(prom: str, queries: dict[str, str], quiet_s: float = 4.0) -> dict[str, float]:
    """Each query's value once none has changed for `quiet_s` (exports and scrapes caught up)."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    last, since = None, time.monotonic()
    while True:
        now = {name: query(prom, q) or 0.0 for name, q in queries.items()}
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
        assert time.monotonic() < deadline, f"metrics never settled: {now}"
        time.sleep(0.5)


def moved_by(prom: str, queries: dict[str, str], before: dict[str, float], expected: dict[str, float]) -> None:
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        deltas = {name: (query(prom, q) or 0.0) - before[name] for name, q in queries.items()}
        if all(abs(deltas[name] - expected[name]) < 1e-9 for name in expected):
            return
        assert time.monotonic() < deadline, f"deltas {deltas} never reached {expected}"
        time.sleep(0.5)


COUNTS = {
    "ok": f'sum(ray_zimage_requests_total{{route="{GEN}",status="200",code=""}})',
    "bad_size": f'sum(ray_zimage_requests_total{{route="{GEN}",status="400",code="invalid_value"}})',
    "no_model": f'sum(ray_zimage_requests_total{{route="{GEN}",status="404",code="model_not_found"}})',
    "images": f'sum(ray_zimage_images_total{{route="{GEN}"}})',
    "latency_512": f'sum(ray_zimage_request_seconds_count{{route="{GEN}",size_class="512"}})',
    "latency_none": f'sum(ray_zimage_request_seconds_count{{route="{GEN}",size_class="none"}})',
    "prompts_encoded": 'sum(ray_zimage_stage_items_total{deployment="TextEncoder",method="encode"})',
    "encode_waits": 'sum(ray_zimage_stage_queue_wait_seconds_count{deployment="TextEncoder",method="encode"})',
    "image_steps": 'sum(ray_zimage_stage_items_total{deployment="Denoiser",method="step"})',
    "steps_run": 'sum(ray_zimage_stage_model_seconds_count{deployment="Denoiser",method="step"})',
    "denoise_waits": 'sum(ray_zimage_stage_queue_wait_seconds_count{deployment="Denoiser",method="step"})',
    "decoded": 'sum(ray_zimage_stage_items_total{deployment="VaeDecoder",method="decode"})',
    "decode_batches": 'sum(ray_zimage_stage_batch_size_count{deployment="VaeDecoder",method="decode"})',
    "styled": 'sum(ray_zimage_stage_items_total{deployment="PromptStyler",method="style"})',
    "style_errors": 'sum(ray_zimage_stage_errors_total{deployment="PromptStyler",method="style"})',
}


def idle(prom: str) -> None:
    """Until no request is in flight: an earlier module's requests (a client that left a stream, say)
    may still be running, and their counts must not land inside this test's deltas."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while (query(prom, "sum(ray_zimage_requests_in_flight)") or 0) > 0:
        assert time.monotonic() < deadline, "requests stayed in flight"
        time.sleep(0.5)


def test_prometheus_sees_exactly_the_traffic_sent_and_request_ids_reach_every_stage(served, prometheus):
    idle(prometheus)
    before = settled(prometheus, COUNTS, quiet_s=6.0)
    request_id = f"obs-{uuid.uuid4().hex}"
    body = {"prompt": "a lighthouse at dusk", "size": "512x512", "num_inference_steps": 2, "seed": 3}
    with httpx.Client(base_url=served.url, timeout=120) as http:
        one = http.post(GEN, json=body, headers={"X-Request-ID": request_id})
        two = http.post(GEN, json={**body, "n": 2})
        bad = http.post(GEN, json={**body, "size": "500x500"}, headers={"X-Request-ID": request_id + "-bad"})
        missing = http.post(GEN, json={**body, "model": "no-such-model"})
        unstyled = http.post(GEN, json={**body, "style": "no-such-style"})  # fails inside the PromptStyler
    assert (one.status_code, two.status_code, bad.status_code, missing.status_code) == (200, 200, 400, 404)
    assert unstyled.status_code == 400 and unstyled.json()["error"]["param"] == "style"

    # The request ID: echoed in every response, named in every error body.
    assert one.headers["x-request-id"] == request_id
    assert bad.headers["x-request-id"] == request_id + "-bad"
    assert bad.json()["error"]["request_id"] == request_id + "-bad"
    assert bad.json()["error"]["param"] == "size"
    assert missing.json()["error"]["request_id"] == missing.headers["x-request-id"] != ""
    timings = one.json()["timings"]
    for stage in ("encode", "denoise", "decode"):
        assert 0 <= timings[f"{stage}_queue_ms"] <= timings[f"{stage}_ms"]

    moved_by(prometheus, COUNTS, before, {
        "ok": 2, "bad_size": 2, "no_model": 1, "images": 3, "latency_512": 3, "latency_none": 2,
        "prompts_encoded": 2, "encode_waits": 2, "image_steps": 6, "denoise_waits": 3, "decoded": 3, "styled": 3,
        "style_errors": 1,
    })  # the bad size and the 404 fail before a size is planned (class "none"); the bad style after
    after = settled(prometheus, COUNTS, quiet_s=2.0)
    assert 2 <= after["steps_run"] - before["steps_run"] <= 6  # the n=2 request's images may share steps
    assert 2 <= after["decode_batches"] - before["decode_batches"] <= 3
    policy = 'ray_zimage_denoiser_scheduling_policy{{policy="{}"}}'
    assert query(prometheus, f"sum({policy.format('continuous')})") == 1
    assert query(prometheus, f"sum({policy.format('batch')})") == 0
    assert (query(prometheus, "sum(ray_zimage_compiles_after_ready_total)") or 0) == 0  # nothing compiles on a CPU
    assert query(prometheus, "sum(ray_zimage_requests_in_flight)") == 0
    assert query(prometheus, "count(ray_zimage_stage_batch_size_count{replica!='',application='zimage'})") >= 4

    # The shipped dashboard: every query parses, and every metric it names is exported (GPU memory
    # and compiles after ready are absent on a CPU where nothing compiles; cancels, key refusals and
    # requests waiting for their release until one happens).
    dashboard = json.loads((Path(__file__).parents[2] / "serve_app/dashboards/zimage.json").read_text())
    names = set(httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10).json()["data"])
    cpu_absent = {"ray_zimage_gpu_memory_allocated_bytes", "ray_zimage_gpu_memory_reserved_bytes",
                  "ray_zimage_compiles_after_ready_total", "ray_zimage_stage_cancelled_total",
                  "ray_zimage_refusals_total", "ray_zimage_release_waiting"}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            response = httpx.get(f"{prometheus}/api/v1/query", params={"query": target["expr"]}, timeout=10)
            assert response.status_code == 200, (panel["title"], response.text)
            used = set(re.findall(r"ray_zimage_\w+", target["expr"]))
            assert used <= names | cpu_absent, (panel["title"], used - names)

    # Each stage's replica log has the request's lines under its ID; the Ingress has its access line.
    logs_dir = served.logs_dir()
    for deployment in ("Ingress", "PromptStyler", "TextEncoder", "Denoiser", "VaeDecoder"):
        assert _log_lines(logs_dir, deployment, request_id), f"{deployment}'s log has no line for {request_id}"
    access = [line for line in _log_lines(logs_dir, "Ingress", request_id) if " access " in line]
    assert len(access) == 1 and "status=200" in access[0] and "size=512x512" in access[0]
    assert "denoise_queue_ms=" in access[0] and "lighthouse" not in access[0]  # no prompt unless turned on
    bad_access = [line for line in _log_lines(logs_dir, "Ingress", request_id + "-bad") if " access " in line]
    assert len(bad_access) == 1 and "status=400" in bad_access[0] and "code=invalid_value" in bad_access[0]


def _log_lines(logs_dir: str, deployment: str, request_id: str) -> list[str]:
    deadline = time.monotonic() + 30
    while True:
        lines = [line for path in glob.glob(f"{logs_dir}/serve/replica_zimage_{deployment}_*.log")
                 for line in open(path, errors="replace") if f" {request_id} " in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)
