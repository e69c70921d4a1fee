"""Tenants without Ray: the token bucket, named keys from every source and their validation, per-key
admission with OpenAI's headers, and the Ingress's fair release."""

from __future__ import annotations

import asyncio
import hashlib
import math

import pytest

from serve_app.auth import authorize, declared_tenant
from serve_app.config import ApiLimits, AppArgs
from serve_app.errors import ApiError
from serve_app.ingress import merged_config
from serve_app.tenants.bucket import TokenBucket
from serve_app.tenants.headers import openai_duration
from serve_app.tenants.keys import ANONYMOUS, UNNAMED, KeyTable, Tenant, TenantKey, node_keys, with_node_keys
from serve_app.tenants.ledger import Ledger
from serve_app.tenants.release import ReleaseGate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# ---- the token bucket -------------------------------------------------------------------------


def test_token_bucket_bursts_a_minute_refills_at_its_rate_and_resizes_keeping_what_was_used():
    clock = Clock()
    bucket = TokenBucket(6, 60.0, clock)
    assert bucket.take(4) and not bucket.take(3) and bucket.take(2)  # all or nothing
    assert bucket.wait_s(1) == pytest.approx(10.0) and bucket.wait_s(7) == math.inf
    clock.now += 25
    assert bucket.available() == pytest.approx(2.5) and bucket.full_in_s() == pytest.approx(35.0)
    bucket.resize(12)  # 3.5 used of 6: 8.5 of 12 left, refilling at 12 a minute
    assert bucket.available() == pytest.approx(8.5) and bucket.rate == pytest.approx(0.2)
    bucket.resize(2)
    assert bucket.available() == 0.0
    clock.now += 600
    assert bucket.available() == 2.0


def test_openai_durations():
    assert [openai_duration(s) for s in (0, 0.0204, 1.0, 1.5, 59.9994, 360.0, 90.25)] == [
        "0ms", "20ms", "1s", "1.5s", "59.999s", "6m0s", "1m30.25s"]


# ---- named keys -------------------------------------------------------------------------------


def named(name: str, key: str | None = None, **limits) -> dict:
    return {"name": name, **({"digest": "sha256:" + digest(key)} if key else {}), **limits}


@pytest.mark.parametrize("entry, problem", [
    (named("team a", "k"), "key name 'team a' is not valid"),
    (named("x" * 65, "k"), "is not valid"),
    (named("anonymous", "k"), "is reserved"),
    (named("a", "k", max_in_flight=0), "key 'a': max_in_flight must be at least 1"),
    (named("a", "k", images_per_minute=-3), "key 'a': images_per_minute must be at least 1"),
    (named("a", "k", weight=0), "key 'a': weight must be a positive finite number"),
    (named("a", "k", weight=float("nan")), "key 'a': weight must be a positive finite number, got nan"),
    ({"name": "a", "digest": "sk-live-raw-key"}, "key 'a': digest must be 'sha256:<64 lowercase hex>'"),
])
def test_a_bad_key_entry_refuses_the_build_naming_the_entry_and_never_its_digest(entry, problem):
    with pytest.raises(ValueError) as refused:
        AppArgs.from_args({"api_keys": [entry]})
    assert problem in str(refused.value)
    assert "sk-live-raw-key" not in str(refused.value) and digest("k") not in str(refused.value)


def test_a_name_or_a_digest_given_twice_is_refused_across_every_way_of_giving_keys():
    with pytest.raises(ValueError, match=r"api\.keys\[0\] and api_keys\[0\] both have the name 'a'"):
        AppArgs.from_args({"api": {"keys": [named("a", "k1")]}, "api_keys": [named("a", "k2")]})
    with pytest.raises(ValueError, match=r"api\.keys\[0\] \('a'\) and api_keys\[0\] are the same key") as same:
        AppArgs.from_args({"api": {"keys": [named("a", "k1")]}, "api_keys": ["sha256:" + digest("k1")]})
    assert digest("k1") not in str(same.value)
    with pytest.raises(ValueError, match=r"api\.keys\[0\] and api\.keys\[1\] both have the name"):
        ApiLimits(keys=(TenantKey(name="a"), TenantKey(name="a")))
    with pytest.raises(ValueError, match=r"api_key_sha256\[1\] is not a SHA-256 digest"):
        ApiLimits(api_key_sha256=(digest("x"), "sk-raw"))


def test_node_keys_take_names_and_the_limits_config_gives_those_names(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("team-b:sk-b\n\n  sk-plain-2  \n")
    env = {"ZIMAGE_API_KEYS": "team-a:sk-a, sk-plain-1", "ZIMAGE_API_KEYS_FILE": str(keys_file)}
    found = node_keys(env)
    assert [(k.name, k.digest, k.entry) for k in found] == [
        ("team-a", digest("sk-a"), "ZIMAGE_API_KEYS entry 1"), (None, digest("sk-plain-1"), "ZIMAGE_API_KEYS entry 2"),
        ("team-b", digest("sk-b"), "ZIMAGE_API_KEYS_FILE line 1"),
        (None, digest("sk-plain-2"), "ZIMAGE_API_KEYS_FILE line 3")]
    config = (TenantKey(name="team-a", max_in_flight=2, weight=3), TenantKey(name="handle-jobs", weight=0.5))
    keys, unnamed = with_node_keys(config, (), found)
    table = KeyTable(keys, unnamed)
    assert table.for_key("sk-a") == Tenant("team-a", 2, None, 3.0)  # the node's key, config's limits
    assert table.for_key("sk-b") == Tenant("team-b") and table.for_key("sk-plain-2") == UNNAMED
    assert table.for_key("sk-handle") is None and table.named("handle-jobs") == Tenant("handle-jobs", weight=0.5)

    with pytest.raises(ValueError, match="ZIMAGE_API_KEYS entry 1: the part before ':' must be a key name") as bad:
        node_keys({"ZIMAGE_API_KEYS": "bad name:sk-secret"})
    assert "sk-secret" not in str(bad.value) and "bad name" not in str(bad.value)
    with pytest.raises(ValueError, match="ZIMAGE_API_KEYS entry 2 names 'team-a', to which api.keys.0. already"):
        with_node_keys((TenantKey(name="team-a", digest=digest("x")),), (), node_keys(
            {"ZIMAGE_API_KEYS": "sk-other,team-a:sk-a"}))
    keys_file.write_text("sk-x\n")
    with pytest.raises(ValueError, match=r"ZIMAGE_API_KEYS entry 1 and ZIMAGE_API_KEYS_FILE line 1 are the same key"):
        with_node_keys((), (), node_keys({"ZIMAGE_API_KEYS": "sk-x", "ZIMAGE_API_KEYS_FILE": str(keys_file)}))


def test_a_live_override_merges_keys_by_name_so_a_limit_changes_without_its_digest():
    base = {"api": {"max_images_per_request": 4, "keys": [named("a", "ka", max_in_flight=2), named("b", "kb")]}}
    merged = merged_config(base, {"api": {"keys": [{"name": "a", "images_per_minute": 30}, named("c", "kc")]}})
    keys = {k["name"]: k for k in merged["api"]["keys"]}
    assert keys["a"] == named("a", "ka", max_in_flight=2, images_per_minute=30)
    assert keys["b"] == named("b", "kb") and "c" in keys and merged["api"]["max_images_per_request"] == 4
    assert base["api"]["keys"][0] == named("a", "ka", max_in_flight=2)  # the bound config is untouched
    twice = merged_config(base, {"api": {"keys": [{"name": "a", "weight": 2}, {"name": "a", "weight": 3}]}})
    with pytest.raises(ValueError, match="both have the name 'a'"):
        ApiLimits.model_validate(twice["api"])


def test_authorize_gives_the_keys_tenant_and_a_handle_declares_one_by_name():
    table = KeyTable((TenantKey(name="a", digest=digest("ka"), max_in_flight=1),), (digest("plain"),))
    assert authorize({"authorization": "Bearer ka"}, table).name == "a"
    assert authorize({"authorization": "Bearer plain"}, table) == UNNAMED
    for headers, code in (({}, "missing_api_key"), ({"authorization": "Bearer nope"}, "invalid_api_key")):
        with pytest.raises(ApiError) as refused:
            authorize(headers, table)
        assert (refused.value.status, refused.value.code) == (401, code)
    assert authorize({}, KeyTable()) == ANONYMOUS
    assert declared_tenant("a", table).max_in_flight == 1 and declared_tenant(None, table) == ANONYMOUS
    with pytest.raises(ApiError) as unknown:
        declared_tenant("nobody", table)
    assert (unknown.value.status, unknown.value.param, unknown.value.code) == (400, "tenant", "unknown_tenant")


# ---- per-key admission ------------------------------------------------------------------------


def test_a_key_over_its_places_gets_a_429_with_openais_headers_and_an_unlimited_key_passes():
    refusals = []
    ledger = Ledger(lambda key, reason: refusals.append((key, reason)), lambda tickets: 2.5)
    limited, free = Tenant("a", max_in_flight=2), Tenant("b")
    for ticket in (1, 2):
        ledger.check(limited)
        ledger.admit(limited, ticket)
    assert ledger.headers(limited) == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "0",
                                       "x-ratelimit-reset-requests": "2.5s"}
    with pytest.raises(ApiError) as refused:
        ledger.check(limited)
    error = refused.value
    assert (error.status, error.type, error.code, error.retry_after_s) == (429, "rate_limit_exceeded",
                                                                          "rate_limit_exceeded", 2.5)
    assert "requests in flight (key 'a'): Limit 2, In flight 2" in error.message
    for ticket in range(3, 50):
        ledger.check(free)
        ledger.admit(free, ticket)
    assert ledger.headers(free) == {} and refusals == [("a", "in_flight")]
    ledger.leave(limited, 1)
    ledger.check(limited)
    assert ledger.headers(limited)["x-ratelimit-remaining-requests"] == "1"


def test_images_per_minute_count_n_and_a_refused_or_unplanned_request_gives_its_image_back():
    clock = Clock()
    ledger = Ledger(clock=clock)
    key = Tenant("a", images_per_minute=6)
    held = ledger.admit(key, 1)
    assert held == 1 and ledger.take_images(key, 4, held) == 4
    assert ledger.headers(key) == {"x-ratelimit-limit-images": "6", "x-ratelimit-remaining-images": "2",
                                   "x-ratelimit-reset-images": "40s"}
    held = ledger.admit(key, 2)
    with pytest.raises(ApiError) as refused:
        ledger.take_images(key, 3, held)  # 2 left, 3 asked: the one taken at admission goes back
    assert refused.value.status == 429 and refused.value.retry_after_s == pytest.approx(10.0)
    assert "images per minute (key 'a'): Limit 6, Remaining 2, Requested 3" in refused.value.message
    with pytest.raises(ApiError) as too_many:
        ledger.take_images(key, 7, 0)
    assert too_many.value.status == 400 and too_many.value.param == "n"
    held = ledger.admit(key, 3)
    ledger.leave(key, 3, unplanned_images=held)  # its body never planned: the image goes back
    assert ledger.usage(key)["images_remaining"] == 2 and ledger.usage(key)["images_last_minute"] == 4
    clock.now += 61
    assert ledger.usage(key)["images_last_minute"] == 0 and ledger.usage(key)["images_remaining"] == 6


def test_with_several_ingress_replicas_each_holds_its_share_rounded_up():
    ledger = Ledger(lambda key, reason: None, lambda tickets: 1.0)
    key = Tenant("a", max_in_flight=5, images_per_minute=30)
    ledger.replicas = 2
    assert ledger.share(5) == 3 and ledger.usage(key)["limits"] == {"max_in_flight": 3, "images_per_minute": 15,
                                                                     "weight": 1.0}
    for ticket in range(3):
        ledger.check(key)
        ledger.admit(key, ticket)
    with pytest.raises(ApiError) as refused:
        ledger.check(key)
    assert "Limit 3 (this replica's share of 5)" in refused.value.message
    ledger.replicas = 1  # re-divided when the count changes
    ledger.check(key)
    assert ledger.headers(key)["x-ratelimit-limit-images"] == "30"


# ---- the Ingress's fair release ---------------------------------------------------------------


def test_the_gate_holds_work_past_its_window_and_releases_it_by_fair_share():
    async def scenario():
        gate = ReleaseGate(window=2)
        a, b = Tenant("a"), Tenant("b")
        order: list[str] = []
        finished = {f"a{i}": asyncio.Event() for i in range(6)} | {"b0": asyncio.Event()}

        async def request(tenant: Tenant, name: str) -> None:
            async with gate.released(tenant, 8.0, 1):
                order.append(name)
                await finished[name].wait()

        tasks = [asyncio.create_task(request(a, f"a{i}")) for i in range(6)]
        await asyncio.sleep(0)
        assert order == ["a0", "a1"] and gate.waiting("a") == 4  # a window of two images
        tasks.append(asyncio.create_task(request(b, "b0")))
        await asyncio.sleep(0)
        assert gate.waiting("b") == 1
        finished["a0"].set()
        await asyncio.sleep(0.01)
        assert order[-1] == "b0"  # the next room goes to b, ahead of a's four queued earlier
        tasks[5].cancel()  # a5 gives up while waiting: it leaves the queue
        await asyncio.sleep(0.01)
        assert gate.waiting("a") == 3
        for event in finished.values():
            event.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return order, gate

    order, gate = asyncio.run(scenario())
    assert order == ["a0", "a1", "b0", "a2", "a3", "a4"] and gate.in_flight == 0 and gate.waiting("a") == 0


def test_weights_share_the_release_and_a_request_larger_than_the_window_still_goes():
    async def scenario():
        gate = ReleaseGate(window=1)
        released: list[str] = []
        heavy, light = Tenant("heavy", weight=3.0), Tenant("light", weight=1.0)

        async def request(tenant: Tenant) -> None:
            async with gate.released(tenant, 4.0, 1):
                released.append(tenant.name)
                await asyncio.sleep(0)

        await asyncio.gather(*(request(t) for _ in range(40) for t in (heavy, light)))
        big = asyncio.create_task(gate.acquire(Tenant("big"), 80.0, 10))  # n=10 over a window of 1
        await asyncio.wait_for(big, 1)
        return released, gate.in_flight

    released, in_flight = asyncio.run(scenario())
    first_40 = released[:40]  # both always waiting here: 3 to 1
    assert first_40.count("heavy") == 30 and first_40.count("light") == 10
    assert in_flight == 10


def test_without_a_window_every_request_is_released_at_once():
    async def scenario():
        gate = ReleaseGate(window=None)
        for _ in range(100):
            await gate.acquire(Tenant("a"), 64.0, 1)
        return gate.in_flight

    assert asyncio.run(scenario()) == 100
