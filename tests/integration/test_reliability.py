"""Chaos and operations on the real Serve app (tiny model, CPU, 127.0.0.1): a replica of each stage
killed under seeded load loses nothing and changes no pixel; readiness under a full queue; a deadline
that stops the work; live config under load; a redeploy that replaces replicas; keys kept out of Ray.

Every test that changes the shared app deploys its base config again before it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from benchmarks.bench_chaos import kill as kill_replica
from benchmarks.bench_chaos import replica_names
from tests.integration.conftest import ServedApp

pytestmark = pytest.mark.integration

GEN = "/v1/images/generations"
LOAD = {"prompt": "a lighthouse on a cliff at dusk", "size": "512x512", "num_inference_steps": 4}
CLIENTS, PER_CLIENT = 3, 2  # closed loop: each client sends its next request when the last returns
SEEDS = [900 + i for i in range(CLIENTS * PER_CLIENT)]


async def _closed_loop(served: ServedApp, seeds: list[int], action: Callable[[], None], headers=None,
                       body=LOAD) -> dict[int, httpx.Response]:
    """Runs `seeds` as CLIENTS closed-loop clients while `action` runs in a thread; all responses by seed."""
    responses: dict[int, httpx.Response] = {}
    async with httpx.AsyncClient(base_url=served.url, timeout=240, headers=headers) as client:
        async def one_client(mine: list[int]) -> None:
            for seed in mine:
                responses[seed] = await client.post(GEN, json={**body, "seed": seed})

        load = asyncio.gather(*(one_client(seeds[i::CLIENTS]) for i in range(CLIENTS)))
        await asyncio.to_thread(action)
        await load
    return responses


def under_load(served: ServedApp, action: Callable[[], None], seeds=SEEDS, **kwargs) -> dict[int, httpx.Response]:
    return asyncio.run(_closed_loop(served, seeds, action, **kwargs))


def assert_all_ok(responses: dict[int, httpx.Response]) -> None:
    failed = {seed: (r.status_code, r.text[:200]) for seed, r in responses.items() if r.status_code != 200}
    assert not failed, f"{len(failed)} of {len(responses)} requests failed: {failed}"


def steps_so_far(served: ServedApp) -> int:
    return served.stats("Denoiser")["methods"].get("step", {}).get("items", 0)


def wait_for_denoising(served: ServedApp, timeout_s: float = 120) -> None:
    before = steps_so_far(served)
    deadline = time.monotonic() + timeout_s
    while steps_so_far(served) == before:
        assert time.monotonic() < deadline, "the load never reached the Denoiser"
        time.sleep(0.05)


def wait_until_ready(served: ServedApp, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{served.url}/health/ready", timeout=10).status_code == 200:
            return
        time.sleep(0.3)
    raise TimeoutError("the app did not become ready again")


@pytest.fixture(scope="module")
def twins(served) -> dict[int, str]:
    """Each seed's image from an undisturbed run."""
    responses = under_load(served, lambda: None)
    assert_all_ok(responses)
    return {seed: r.json()["data"][0]["b64_json"] for seed, r in responses.items()}


@pytest.mark.parametrize("stage", ["Denoiser", "VaeDecoder", "TextEncoder", "PromptStyler"])
def test_a_replica_killed_under_load_loses_no_request_and_changes_no_pixel(served, twins, stage):
    killed: list[str] = []

    def kill_mid_request() -> None:
        wait_for_denoising(served)  # requests are in every stage's hands now or next
        killed.append(kill_replica(stage))

    responses = under_load(served, kill_mid_request)
    assert_all_ok(responses)
    for seed, response in responses.items():
        assert response.json()["data"][0]["b64_json"] == twins[seed], f"seed {seed} changed after the kill"
    wait_until_ready(served)
    assert replica_names(stage) and replica_names(stage) != killed  # Serve replaced it


LIMITS_REACH_ROUTER_S = 60


def test_readiness_answers_fast_and_true_under_a_full_queue(served):
    """Readiness comes from the control plane: a Denoiser whose queue is full is busy, not down."""
    limits = {"name": "Denoiser", "max_ongoing_requests": 1, "max_queued_requests": 1,
              "user_config": served.args["denoiser"]["user_config"]}
    try:
        served.deploy([limits])
        deadline = time.monotonic() + LIMITS_REACH_ROUTER_S
        for attempt in range(100):
            # the new limits reach the Ingress's router some time after the deploy reports RUNNING (a
            # live update, no new replica): a load that starts before them fills no queue, so try again,
            # for a bounded time (three loads were too short on a fast machine: the loads end sooner)
            if attempt and time.monotonic() > deadline:
                break
            time.sleep(1.0 if attempt else 0.0)
            timings: list[float] = []
            statuses: list[int] = []

            def probe() -> None:
                wait_for_denoising(served)
                for _ in range(10):
                    start = time.perf_counter()
                    response = httpx.get(f"{served.url}/health/ready", timeout=10)
                    timings.append(time.perf_counter() - start)
                    statuses.append(response.status_code)
                    time.sleep(0.05)

            seeds = list(range(500 + 10 * attempt, 506 + 10 * attempt))
            responses = under_load(served, probe, seeds=seeds, body={**LOAD, "num_inference_steps": 8})
            overloaded = sum(r.status_code == 503 for r in responses.values())
            if overloaded:
                break
        assert overloaded > 0, f"the queue never filled in {attempt + 1} loads: the test proves nothing"
        refusals = [r for r in responses.values() if r.status_code == 503]
        assert all(int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) > 0 for r in refusals)
        assert statuses == [200] * 10, statuses
        # fast: a readiness answer that waited on the Denoiser's queue would take about as long as a
        # request does; the bound is relative, as a 2-core machine under this load slows both
        readiness = sorted(timings)[len(timings) // 2]
        accepted = sorted(r.elapsed.total_seconds() for r in responses.values() if r.status_code == 200)
        request = accepted[len(accepted) // 2]
        print(f"readiness median {readiness * 1000:.0f} ms, accepted request median {request * 1000:.0f} ms")
        assert readiness < min(1.0, request / 4), f"readiness median {readiness:.3f}s, request median {request:.3f}s"
    finally:
        served.deploy()


def test_a_request_past_its_deadline_gets_504_and_its_work_stops(served):
    before = served.stats("Denoiser")
    body = {"prompt": "a lighthouse in a storm", "size": "1024x1024", "num_inference_steps": 16, "seed": 1}
    started = time.monotonic()
    response = httpx.post(f"{served.url}{GEN}", json=body, headers={"X-Request-Timeout": "1.5"}, timeout=120)
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert elapsed < 30
    deadline = time.monotonic() + 30
    while True:
        after = served.stats("Denoiser")
        dropped = (after["expired"] + after["cancelled"]) - (before["expired"] + before["cancelled"])
        if dropped >= 1:
            break
        assert time.monotonic() < deadline, "the Denoiser never dropped the expired job"  # at its next step
        time.sleep(0.2)
    settled = steps_so_far(served)
    time.sleep(1.5)  # had the job gone on, it would step on meanwhile
    assert steps_so_far(served) == settled
    assert settled - before["methods"].get("step", {}).get("items", 0) < 16

    bad = httpx.post(f"{served.url}{GEN}", json=body, headers={"X-Request-Timeout": "soon"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Timeout"


def test_a_denoiser_override_applies_under_load_and_its_removal_restores_the_shipped_values(served):
    shipped = served.stats("Denoiser")["config"]
    override = {"max_batch_size": 2, "scheduling": "batch"}
    try:
        assert_all_ok(under_load(served, lambda: served.deploy([{"name": "Denoiser", "user_config": override}])))
        config = served.stats("Denoiser")["config"]
        assert {k: config[k] for k in override} == override
        assert config["batch_wait_timeout_s"] == shipped["batch_wait_timeout_s"]  # what it did not name, kept
    finally:
        assert_all_ok(under_load(served, served.deploy))  # the override removed, under load
    assert served.stats("Denoiser")["config"] == shipped


def test_keys_stay_off_ray_an_ingress_override_keeps_the_args_limits_and_the_way_back_fails_no_request(
        served, twins, tmp_path):
    """Keys from a file and from args stay off Ray, and a live Ingress override keeps the args' limits.
    Going back to the session's args is a redeploy that replaces every replica, the Denoiser's
    included (new args, new code version): done under load, it fails no request and changes no pixel.
    One test, as each change of args restarts the whole app (most of a minute on a 2-core machine)."""
    file_key, args_key = "sk-from-file-7f3a91", "sk-digest-only-2c8e44"
    keys_file = Path(tmp_path) / "api_keys"
    keys_file.write_text(f"{file_key}\n")
    ingress = {"ray_actor_options": {"runtime_env": {"env_vars": {"ZIMAGE_API_KEYS_FILE": str(keys_file)}}}}
    args = {**served.args, "api_keys": [f"sha256:{hashlib.sha256(args_key.encode()).hexdigest()}"],
            "ingress": ingress}
    keyed = dataclasses.replace(served, args=args)
    auth = {"Authorization": f"Bearer {file_key}"}
    try:
        keyed.deploy()
        wait_for(lambda: httpx.get(f"{served.url}/v1/models", timeout=10).status_code == 401)
        for path in ("/docs", "/openapi.json", "/redoc", "/v1/models"):
            assert httpx.get(f"{served.url}{path}", timeout=10).status_code == 401, path
            for key in (file_key, args_key):
                ok = httpx.get(f"{served.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=10)
                assert ok.status_code == 200, (path, ok.text[:200])

        override = [{"name": "Ingress", "user_config": {"api": {"max_inflight_requests": 32,
                                                                 "max_images_per_request": 2}}}]
        assert_all_ok(under_load(keyed, lambda: keyed.deploy(override), headers=auth))
        wait_for(lambda: _refuses_three_images(served, auth))  # the override applies...
        assert httpx.get(f"{served.url}/v1/models", timeout=10).status_code == 401  # ...the keys stay
        too_big = httpx.post(f"{served.url}{GEN}", headers=auth, timeout=30,
                             json={"prompt": "x" * (70 << 10)})  # and so does the args' body limit
        assert too_big.status_code == 413

        import ray
        from ray.serve.context import _get_global_client

        details = json.dumps(_get_global_client().get_serve_details(), default=str)
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        for key in (file_key, args_key):
            assert key not in details, "a raw key reached Serve's config or status"
            leaks = [p for p in session.rglob("*") if p.is_file() and _contains(p, key.encode())]
            assert not leaks, f"a raw key reached Ray's files: {leaks[:5]}"

        pid = served.stats("Denoiser")["pid"]

        def replace_mid_request() -> None:
            wait_for_denoising(served)
            served.deploy()  # the session's args: keys off, every replica replaced

        # the key is sent all along: it is needed until the new Ingress takes over, and ignored after
        responses = under_load(served, replace_mid_request, headers=auth)
        assert_all_ok(responses)
        assert served.stats("Denoiser")["pid"] != pid, "the Denoiser was not replaced"
        assert all(r.json()["data"][0]["b64_json"] == twins[seed] for seed, r in responses.items())
    finally:
        served.deploy()  # nothing to do when the way back above ran
        wait_for(lambda: httpx.get(f"{served.url}/v1/models", timeout=10).status_code == 200)


def _refuses_three_images(served: ServedApp, auth: dict) -> bool:
    body = {**LOAD, "n": 3, "num_inference_steps": 1}
    response = httpx.post(f"{served.url}{GEN}", headers=auth, json=body, timeout=60)
    return response.status_code == 400 and "at most 2" in response.text


def _contains(path: Path, needle: bytes) -> bool:
    try:
        return needle in path.read_bytes()
    except OSError:
        return False


def wait_for(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)
