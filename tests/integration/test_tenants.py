"""Named keys on the real Serve app (tiny, CPU), through the official `openai` client: a limited key's
429 with OpenAI's headers and the client's own retries, a key's places taken and refused before the
body is read (over raw sockets), an unlimited key beside it, a live limit
change, a refused live update, GET /v1/usage, a handle caller's tenant, and the key's name (never
the key or its digest) in logs and in what a real Prometheus scrapes.

One Ingress live config for the module (the keys below); each test uses keys of its own, so their
limits do not meet. Fairness between keys is a speed figure: benchmarks/bench_tenants.py measures it.
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import json
import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from serve_app.errors import ApiError
from serve_app.protocol import ImageRequest
from tests.integration.conftest import APP_NAME, ServedApp, off_loop
from tests.integration.test_observability import (  # noqa: F401  (a module's own Prometheus)
    prometheus,
    query,
    scrape_health,
    scraped,
)

pytestmark = pytest.mark.integration

GEN = "/v1/images/generations"
FAST = {"seed": 5, "num_inference_steps": 1}
RAW = {name: f"sk-tenant-{name}-5d1c7a" for name in ("pacer", "single", "free", "live", "gate")}


def digest(name: str) -> str:
    return hashlib.sha256(RAW[name].encode()).hexdigest()


def keys(live_images_per_minute: int = 1, extra: list[dict] | None = None) -> list[dict]:
    return [
        {"name": "pacer", "digest": f"sha256:{digest('pacer')}", "images_per_minute": 3},
        {"name": "single", "digest": f"sha256:{digest('single')}", "max_in_flight": 1},
        {"name": "free", "digest": f"sha256:{digest('free')}", "weight": 2},
        {"name": "live", "digest": f"sha256:{digest('live')}", "images_per_minute": live_images_per_minute},
        {"name": "handle-jobs", "images_per_minute": 2},  # no digest: only handle callers name it
        {"name": "gate", "digest": f"sha256:{digest('gate')}", "max_in_flight": 1},
        *(extra or []),
    ]


def deploy_keys(served: ServedApp, **kwargs) -> None:
    served.deploy([{"name": "Ingress", "user_config": {"api": {"keys": keys(**kwargs)}}}])


def usage(served: ServedApp, name: str) -> httpx.Response:
    return httpx.get(f"{served.url}/v1/usage", headers={"Authorization": f"Bearer {RAW[name]}"}, timeout=30)


def wait_for(check, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def client(served: ServedApp, name: str, max_retries: int = 0, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=RAW[name], timeout=120, max_retries=max_retries,
                         **kwargs)


@pytest.fixture(scope="module")
def tenants(served) -> Iterator[ServedApp]:
    try:
        deploy_keys(served)
        wait_for(lambda: usage(served, "pacer").status_code == 200)
        yield served
    finally:
        served.deploy()
        wait_for(lambda: httpx.get(f"{served.url}/v1/models", timeout=10).status_code == 200)


def test_a_limited_key_gets_openais_rate_limit_answer_beside_an_unlimited_key(tenants):
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:  # the unlimited key, all along
        with client(tenants, "free") as free:
            beside = [pool.submit(free.images.with_raw_response.generate, prompt="a fox", size="512x512",
                                  extra_body={**FAST, "seed": i}) for i in range(3)]
            with client(tenants, "pacer") as pacer:
                spent_at = time.monotonic()  # the three images' tokens go at admission, after this
                first = pacer.images.with_raw_response.generate(prompt="a fox", size="512x512", n=3, extra_body=FAST)
                assert len(first.parse().data) == 3
                assert first.headers["x-ratelimit-limit-images"] == "3"
                assert first.headers["x-ratelimit-remaining-images"] == "0"
                assert first.headers["x-ratelimit-reset-images"].endswith("s")
                assert "x-ratelimit-limit-requests" not in first.headers  # pacer has no places limit
                with pytest.raises(openai.RateLimitError) as refused:
                    pacer.images.generate(prompt="a fox", size="512x512", extra_body=FAST)
                refused_by = time.monotonic() - spent_at
            answers = [future.result() for future in beside]
    error, headers = refused.value, refused.value.response.headers
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.body["type"] == "rate_limit_exceeded" and "images per minute (key 'pacer')" in error.message
    assert "Limit 3, Remaining 0, Requested 1" in error.message
    wait_s = int(headers["retry-after-ms"]) / 1000
    # one image refills in a third of a minute; less what refilled between admission and refusal
    assert 20 - refused_by - 0.01 <= wait_s <= 20, (wait_s, refused_by)
    assert int(headers["retry-after"]) == max(1, -(-int(headers["retry-after-ms"]) // 1000))
    assert headers["x-ratelimit-remaining-images"] == "0"
    assert all(len(a.parse().data) == 1 and "x-ratelimit-limit-images" not in a.headers for a in answers)
    no_key = httpx.post(f"{tenants.url}{GEN}", json={"prompt": "a fox", **FAST}, timeout=30)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "missing_api_key"

    own = usage(tenants, "pacer").json()
    assert (own["key"], own["images_last_minute"], own["in_flight"]) == ("pacer", 3, 0)
    assert own["refused"]["images_per_minute"] >= 1 and own["limits"]["images_per_minute"] == 3
    other = usage(tenants, "free").json()  # another key sees its own counts only
    assert other["key"] == "free" and other["refused"] == {"in_flight": 0, "images_per_minute": 0, "capacity": 0}
    assert other["limits"] == {"max_in_flight": None, "images_per_minute": None, "weight": 2.0}
    assert httpx.get(f"{tenants.url}/v1/usage", timeout=30).status_code == 401


def test_the_clients_own_retries_succeed_once_its_place_frees(tenants):
    statuses: list[int] = []
    hooks = {"response": [lambda response: statuses.append(response.status_code)]}
    with client(tenants, "single", max_retries=5, http_client=httpx.Client(event_hooks=hooks)) as single:
        stream = single.images.generate(prompt="a fox", size="512x512", stream=True, partial_images=1,
                                        extra_body={"seed": 1, "num_inference_steps": 2})
        events = iter(stream)  # a started stream holds the key's one place until it ends
        first_event = next(events)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            second = pool.submit(single.images.generate, prompt="a fox", size="512x512", extra_body=FAST)
            wait_for(lambda: 429 in statuses)  # refused while the stream holds the place...
            rest = list(events)  # ...which frees when the stream ends
            assert len(second.result().data) == 1  # and the client's own retry gets in
    assert first_event.type == "image_generation.partial_image" and rest[-1].type == "image_generation.completed"
    assert statuses.count(200) == 2 and usage(tenants, "single").json()["refused"]["in_flight"] == statuses.count(429)


def _post_head(served: ServedApp, name: str, declared_bytes: int = 4096) -> socket.socket:
    """A generation whose headers and first body bytes are sent, and the rest of its body never (it
    declares a size under the JSON body limit, which a larger one would be refused for at once)."""
    host, port = served.url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall((f"POST {GEN} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {RAW[name]}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {declared_bytes}\r\n\r\n"
                  '{"prompt": "a fox", "size": "512x512", ').encode())
    return conn


def _answer(conn: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the answer on `conn` (read up to its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536) or b"<closed>"
        assert not data.endswith(b"<closed>"), data
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += conn.recv(65536)
    return int(head.split(b" ")[1]), json.loads(body)


def test_a_key_over_its_places_is_refused_before_its_body_arrives_and_a_hang_up_frees_the_place(tenants):
    """The places are taken before the body is read: a request whose body never arrives holds the
    key's one place, and the next one is refused on its headers alone (its body never arrives either)."""
    holder = _post_head(tenants, "gate")
    try:
        wait_for(lambda: usage(tenants, "gate").json()["in_flight"] == 1)
        refused = _post_head(tenants, "gate")
        try:
            status, body = _answer(refused)
        finally:
            refused.close()
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded", body
        assert "(key 'gate')" in body["error"]["message"]
    finally:
        holder.close()  # the client hangs up mid-body: its place comes back
    wait_for(lambda: usage(tenants, "gate").json()["in_flight"] == 0)
    with client(tenants, "gate") as gate:
        assert len(gate.images.generate(prompt="a fox", size="512x512", extra_body=FAST).data) == 1


def test_a_live_limit_change_applies_to_the_next_request_and_a_bad_one_is_refused(tenants):
    with client(tenants, "live") as live:
        live.images.generate(prompt="a fox", size="512x512", extra_body=FAST)
        with pytest.raises(openai.RateLimitError):
            live.images.generate(prompt="a fox", size="512x512", extra_body=FAST)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, client(tenants, "free") as free:
            running = pool.submit(free.images.generate, prompt="a fox", size="512x512",
                                  extra_body={"seed": 2, "num_inference_steps": 4})
            deploy_keys(tenants, live_images_per_minute=100)  # in place, under the running request
            wait_for(lambda: usage(tenants, "live").json()["limits"]["images_per_minute"] == 100)
            assert len(live.images.generate(prompt="a fox", size="512x512", extra_body=FAST).data) == 1
            assert len(running.result().data) == 1

    # a second entry named 'live': refused, the replica keeps serving with the config it has
    deploy_keys(tenants, live_images_per_minute=100, extra=[{"name": "live", "weight": 3}])
    wait_for(lambda: bool(_log_lines(tenants, "live config refused")))
    refusal = _log_lines(tenants, "live config refused")[-1]
    assert "api.keys[3] and api.keys[6] both have the name 'live'" in refusal, refusal
    assert not any(digest(name) in refusal for name in RAW)
    from ray import serve

    assert serve.status().applications[APP_NAME].status == "RUNNING"
    assert usage(tenants, "live").json()["limits"]["images_per_minute"] == 100
    deploy_keys(tenants)  # back to the module's config


def test_a_handle_callers_tenant_takes_that_keys_limits(tenants):
    from ray import serve

    def generate(n: int, tenant: str | None):
        request = ImageRequest(prompt="a fox", n=n, width=512, height=512, steps=1, seed=3, tenant=tenant)
        return off_loop(lambda: serve.get_app_handle(APP_NAME).generate.remote(request).result(timeout_s=120))

    assert len(generate(2, "handle-jobs").images) == 2
    with pytest.raises(ApiError) as refused:
        generate(1, "handle-jobs")
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    with pytest.raises(ApiError) as unknown:
        generate(1, "nobody")
    assert (unknown.value.status, unknown.value.code) == (400, "unknown_tenant")
    assert len(generate(1, None).images) == 1  # no tenant: anonymous, unlimited


def test_metrics_and_logs_name_the_key_never_the_key_or_its_digest(tenants, prometheus):  # noqa: F811
    secrets = [*RAW.values(), *(digest(name) for name in RAW)]
    counts = {
        "pacer_refused": 'sum(ray_zimage_refusals_total{key="pacer",reason="images_per_minute"})',
        "pacer_429": f'sum(ray_zimage_requests_total{{route="{GEN}",key="pacer",status="429"}})',
        "free_ok": f'sum(ray_zimage_requests_total{{route="{GEN}",key="free",status="200"}})',
        "single_latency": f'sum(ray_zimage_request_seconds_count{{route="{GEN}",key="single"}})',
        "handle_jobs": 'sum(ray_zimage_requests_total{route="handle:generate",key="handle-jobs"})',
    }
    deadline = time.monotonic() + 120
    while not (scraped(prometheus) and all((query(prometheus, q) or 0) >= 1 for q in counts.values())):
        assert time.monotonic() < deadline, f"{ {n: query(prometheus, q) for n, q in counts.items()} }; " \
                                            f"{scrape_health(prometheus)}"
        time.sleep(0.5)
    series = httpx.get(f"{prometheus}/api/v1/series", params={"match[]": '{__name__=~"ray_zimage_.*"}'},
                       timeout=30).json()["data"]
    labels = json.dumps(series)
    assert '"key": "pacer"' in labels and not any(secret in labels for secret in secrets)
    access = _log_lines(tenants, " access ")
    assert any("key=pacer" in line and "status=429" in line for line in access)
    assert any("key=free" in line and "status=200" in line for line in access)
    logs = tenants.logs_dir()
    for path in glob.glob(f"{logs}/serve/*.log") + glob.glob(f"{logs}/worker-*") + glob.glob(f"{logs}/*.log"):
        text = open(path, errors="replace").read()
        assert not any(secret in text for secret in secrets), f"a key or its digest reached {path}"


def _log_lines(served: ServedApp, needle: str) -> list[str]:
    return [line for path in glob.glob(f"{served.logs_dir()}/serve/replica_{APP_NAME}_Ingress_*.log")
            for line in open(path, errors="replace") if needle in line]
