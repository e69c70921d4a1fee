"""Reliability pieces without Ray Serve: which failures are retried, deadlines in every Denoiser
policy, the model lane's health record, and API keys that never pass through args raw."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import pickle
import time

import pytest
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import RayServeException

from deployments.contracts import DenoiseJob
from deployments.runtime.deadlines import DeadlineExceeded
from deployments.runtime.gpu_lane import GpuLane
from deployments.denoiser.scheduling import ContinuousBatcher, run_grouped
from serve_app.config import AppArgs, ApiLimits
from serve_app.errors import ApiError, api_error_for
from serve_app.retry import RetryPolicy, is_replica_failure
from tests.unit.test_scheduling import job

FAST = RetryPolicy(attempts=3, first_backoff_s=0.01, max_backoff_s=0.02)


def upstream_death() -> RayServeException:
    """What Serve raises at a downstream call whose argument came from a replica that died."""
    wrapped = RayServeException("Request to deployment 'VaeDecoder' failed because an upstream actor died")
    wrapped.__cause__ = ActorDiedError()
    return wrapped


def test_replica_deaths_are_retried_and_request_faults_are_not():
    assert is_replica_failure(ActorDiedError()) and is_replica_failure(upstream_death())
    assert is_replica_failure(ActorUnavailableError("gone", None))
    for fault in (ApiError(400, "bad"), ValueError("x"), DeadlineExceeded(), RayServeException("other")):
        assert not is_replica_failure(fault)

    def flaky(failures: list[BaseException]):
        calls = []

        async def call(attempt: int) -> str:
            calls.append(attempt)
            if failures:
                raise failures.pop(0)
            return "image"

        return call, calls

    call, calls = flaky([ActorDiedError(), upstream_death()])
    assert asyncio.run(FAST.run(call)) == "image" and calls == [0, 1, 2]
    call, calls = flaky([ApiError(400, "bad")])
    with pytest.raises(ApiError):
        asyncio.run(FAST.run(call))
    assert calls == [0]
    call, calls = flaky([ActorDiedError()] * 5)
    with pytest.raises(ActorDiedError):
        asyncio.run(FAST.run(call))
    assert calls == [0, 1, 2]  # bounded
    call, calls = flaky([ActorDiedError()] * 5)
    with pytest.raises(ActorDiedError):
        asyncio.run(FAST.run(call, deadline=time.time() + 0.001))
    assert calls == [0]  # no retry past the deadline


def test_errors_map_to_documented_statuses():
    assert api_error_for(DeadlineExceeded()).status == 504
    assert api_error_for(DeadlineExceeded()).code == "deadline_exceeded"
    exhausted = api_error_for(upstream_death())
    assert exhausted.status == 503 and exhausted.code == "replica_unavailable"


def expiring(base: DenoiseJob, seconds: float) -> DenoiseJob:
    return dataclasses.replace(base, deadline=time.time() + seconds)


def test_a_job_past_its_deadline_leaves_the_continuous_batch_at_the_next_step(pipeline):
    sizes: list[int] = []

    async def scenario():
        batcher = ContinuousBatcher(pipeline.loop, max_batch_size=4, record=lambda n, s: sizes.append(n))
        keep = asyncio.create_task(batcher.submit(job(20, (512, 512), 6, 1)))
        late = asyncio.create_task(batcher.submit(expiring(job(20, (512, 512), 40, 2), 0.3)))
        stale = asyncio.create_task(batcher.submit(expiring(job(20, (512, 512), 6, 3), -1)))
        return await asyncio.gather(keep, late, stale, return_exceptions=True)

    kept, late, stale = run(scenario())
    assert kept.steps_run == 6 and isinstance(late, DeadlineExceeded) and isinstance(stale, DeadlineExceeded)
    assert sum(sizes) < 6 + 40  # the late job stopped stepping; the stale one never started
    assert max(sizes) == 2


def test_grouped_policies_drop_expired_jobs_before_and_between_steps(pipeline):
    steps: list[int] = []
    jobs = [job(20, (512, 512), 2, 1), expiring(job(20, (512, 512), 2, 2), -1)]
    results = run_grouped(pipeline.loop, jobs, lambda n, s: steps.append(n))
    assert results[0].steps_run == 2 and isinstance(results[1], DeadlineExceeded) and steps == [1, 1]

    slow = expiring(job(20, (512, 512), 500, 3), 0.2)
    started = time.monotonic()
    assert isinstance(run_grouped(pipeline.loop, [slow], lambda n, s: None)[0], DeadlineExceeded)
    assert time.monotonic() - started < 10  # 500 steps would take far longer


def run(coro):
    return asyncio.run(coro)


def test_the_lane_records_a_fatal_device_error_and_a_stuck_call():
    lane = GpuLane("health")

    def crash():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError):
        lane.run_blocking(lambda: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("out of memory")))
    assert lane.health_problem(60) is None  # out-of-memory fails a request, not the replica
    with pytest.raises(RuntimeError):
        lane.run_blocking(crash)
    assert "illegal memory access" in lane.health_problem(60)

    lane = GpuLane("stuck")

    async def scenario():
        call = asyncio.ensure_future(lane.run(time.sleep, 0.5))
        await asyncio.sleep(0.3)
        stuck = lane.health_problem(0.1)
        await call
        return stuck, lane.health_problem(0.1)

    stuck, after = run(scenario())
    assert stuck and "over 0.1s" in stuck and after is None


def test_raw_api_keys_are_refused_in_args_and_come_from_the_node(tmp_path, monkeypatch):
    with pytest.raises(ValueError) as refused:
        AppArgs.from_args({"api_keys": "sk-raw-secret"})
    assert "sk-raw-secret" not in str(refused.value) and "ZIMAGE_API_KEYS_FILE" in str(refused.value)
    digest = hashlib.sha256(b"sk-from-args").hexdigest()
    args = AppArgs.from_args({"api_keys": f"sha256:{digest}"})
    assert args.stage_user_config("ingress")["api"]["api_key_sha256"] == [digest]

    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-file-1\n\n  sk-file-2  \n")
    monkeypatch.setenv("ZIMAGE_API_KEYS_FILE", str(keys_file))
    monkeypatch.setenv("ZIMAGE_API_KEYS", "sk-env")
    limits = ApiLimits(api_key_sha256=(digest,)).with_env_keys()
    expected = [hashlib.sha256(k.encode()).hexdigest() for k in ("sk-env", "sk-file-1", "sk-file-2")]
    assert list(limits.api_key_sha256) == [digest, *expected]


def test_an_api_error_crosses_a_process_whole():
    """A handle caller gets the Ingress's error as raised: status, code, type and Retry-After."""
    error = pickle.loads(pickle.dumps(ApiError(429, "slow down", param="n", code="rate_limit_exceeded",
                                               retry_after_s=2.5)))
    assert (error.status, error.message, error.param, error.code, error.type, error.retry_after_s) == (
        429, "slow down", "n", "rate_limit_exceeded", "rate_limit_exceeded", 2.5)
