"""Batching and Denoiser scheduling on the CPU: batches really form, requests join and leave between
steps, cancelled requests are dropped, waiting requests join by fair share between tenants, and a
request's image does not depend on its batch."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from deployments.runtime.batching import DynamicBatcher
from deployments.contracts import DenoiseJob, TenantTag
from deployments.denoiser.scheduling import ContinuousBatcher, run_grouped


def run(coro):
    return asyncio.run(coro)


def test_items_arriving_during_a_batch_form_the_next_batch():
    sizes = []

    async def slow_double(items):
        sizes.append(len(items))
        await asyncio.sleep(0.05)
        return [2 * i for i in items]

    async def scenario():
        batcher = DynamicBatcher(slow_double, max_batch_size=4)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)  # the first batch (of one) is running now
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 7)]
        return await asyncio.gather(first, *rest)

    assert run(scenario()) == [0, 2, 4, 6, 8, 10, 12]
    assert sizes == [1, 4, 2]


def test_a_failed_item_fails_alone_and_a_failed_batch_fails_all():
    async def picky(items):
        if "boom" in items:
            raise RuntimeError("batch broke")
        return [ValueError(f"bad {i}") if i == "bad" else i.upper() for i in items]

    async def scenario():
        batcher = DynamicBatcher(picky, max_batch_size=8, wait_s=0.05)
        good, bad = await asyncio.gather(batcher.submit("ok"), batcher.submit("bad"), return_exceptions=True)
        broken = await asyncio.gather(batcher.submit("x"), batcher.submit("boom"), return_exceptions=True)
        return good, bad, broken

    good, bad, broken = run(scenario())
    assert good == "OK" and isinstance(bad, ValueError)
    assert all(isinstance(b, RuntimeError) for b in broken)


def test_wait_holds_a_batch_open_for_company():
    sizes = []

    async def record(items):
        sizes.append(len(items))
        return items

    async def scenario():
        batcher = DynamicBatcher(record, max_batch_size=8, wait_s=0.2)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.05)
        await asyncio.gather(first, batcher.submit(2), batcher.submit(3))

    run(scenario())
    assert sizes == [3]


def job(caption_len: int, size: tuple[int, int], steps: int, seed: int) -> DenoiseJob:
    caption = torch.randn(caption_len, 64, generator=torch.Generator().manual_seed(seed))
    return DenoiseJob(caption=caption, width=size[0], height=size[1], steps=steps, seed=seed)


def test_aclose_ends_the_drain_task_and_cancels_what_it_held_and_a_closed_loop_holds_no_pending_task():
    """A batcher's task ends on `aclose` (none is left pending for a closed loop to report destroyed): the
    batch it was running and the items queued behind it are cancelled, not left waiting; a later submit
    starts a new task. `close` cancels it from a plain call (a replica's `__del__`)."""
    started = []

    async def forever(items):
        started.append(items)
        await asyncio.Event().wait()

    async def scenario():
        batcher = DynamicBatcher(forever, max_batch_size=1)
        running = asyncio.create_task(batcher.submit("a"))
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(batcher.submit("b"))
        await asyncio.sleep(0.01)
        task = batcher._task
        assert started == [["a"]] and not task.done()
        await batcher.aclose()
        assert task.done() and batcher._task is None and not batcher.queue
        outcomes = await asyncio.gather(running, queued, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
        batcher.run_batch = lambda items: asyncio.sleep(0, [i.upper() for i in items])
        assert await batcher.submit("c") == "C"  # a new task
        task = batcher._task
        batcher.close()
        await asyncio.wait([task], timeout=5)
        assert task.cancelled()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
        assert not [t for t in asyncio.all_tasks(loop) if not t.done()]
    finally:
        loop.close()


def test_continuous_batching_joins_and_leaves_between_steps(pipeline):
    steps_seen: list[int] = []
    loop = pipeline.loop

    async def scenario():
        batcher = ContinuousBatcher(loop, max_batch_size=4, record=lambda n, s: steps_seen.append(n))
        long = asyncio.create_task(batcher.submit(job(20, (512, 512), 6, 1)))
        while len(steps_seen) < 2:  # the long job is under way alone
            await asyncio.sleep(0.005)
        short = asyncio.create_task(batcher.submit(job(50, (512, 512), 2, 2)))
        return await asyncio.gather(long, short)

    long_result, short_result = run(scenario())
    assert (long_result.steps_run, short_result.steps_run) == (6, 2)
    assert steps_seen[:2] == [1, 1]
    assert 2 in steps_seen  # the short job joined the running batch
    assert steps_seen[-1] == 1  # and left it before the long job finished
    assert sum(steps_seen) == 8


def test_continuous_batching_buckets_by_resolution_and_matches_jobs_run_alone(pipeline):
    jobs = [job(20, (512, 512), 3, 1), job(60, (640, 512), 3, 2), job(33, (512, 512), 2, 3), job(7, (640, 512), 1, 4)]
    sizes: list[int] = []

    async def scenario():
        batcher = ContinuousBatcher(pipeline.loop, max_batch_size=8, record=lambda n, s: sizes.append(n))
        return await asyncio.gather(*(batcher.submit(j) for j in jobs))

    results = run(scenario())
    assert max(sizes) == 2  # two resolutions, two jobs each: never mixed in one DiT call
    assert pipeline.loop.batch_invariant  # the CPU default: one DiT call per job, so results are identical
    alone = [pipeline.loop.run([j])[0] for j in jobs]
    batched_images = pipeline.codec.decode(results)
    alone_images = pipeline.codec.decode(alone)
    for b, a, bi, ai in zip(results, alone, batched_images, alone_images):
        assert torch.equal(b.latents, a.latents)
        assert torch.equal(bi.pixels, ai.pixels)


def test_a_cancelled_request_is_dropped_at_the_next_step(pipeline):
    sizes: list[int] = []

    async def scenario():
        batcher = ContinuousBatcher(pipeline.loop, max_batch_size=4, record=lambda n, s: sizes.append(n))
        keep = asyncio.create_task(batcher.submit(job(20, (512, 512), 6, 1)))
        drop = asyncio.create_task(batcher.submit(job(20, (512, 512), 6, 2)))
        while len(sizes) < 2:
            await asyncio.sleep(0.005)
        drop.cancel()
        result = await keep
        return result, batcher.cancelled

    result, cancelled = run(scenario())
    assert result.steps_run == 6 and cancelled == 1
    assert sizes[0] == 2 and sizes[-1] == 1 and len(sizes) == 6


def test_grouped_policy_runs_each_resolution_as_one_batch(pipeline):
    sizes: list[int] = []
    jobs = [job(20, (512, 512), 2, 1), job(30, (640, 512), 2, 2), job(40, (512, 512), 2, 3)]
    results = run_grouped(pipeline.loop, jobs, lambda n, s: sizes.append(n))
    assert sizes == [2, 2, 1, 1]
    assert [r.width for r in results] == [512, 640, 512]


def test_a_bad_job_fails_alone_in_a_group(pipeline):
    bad = DenoiseJob(caption=torch.randn(5, 64), width=512, height=512, steps=2, seed=1, guidance_scale=3.0)
    results = run_grouped(pipeline.loop, [job(20, (512, 512), 2, 1), bad], lambda n, s: None)
    assert results[0].steps_run == 2 and isinstance(results[1], ValueError)


@pytest.mark.parametrize("policy_batch", [1, 3])
def test_step_batches_never_exceed_the_limit(pipeline, policy_batch):
    sizes: list[int] = []

    async def scenario():
        batcher = ContinuousBatcher(pipeline.loop, max_batch_size=policy_batch, record=lambda n, s: sizes.append(n))
        await asyncio.gather(*(batcher.submit(job(10, (512, 512), 2, i)) for i in range(5)))

    run(scenario())
    assert max(sizes) == policy_batch and sum(sizes) == 10


def test_waiting_jobs_join_by_fair_share_between_tenants_each_in_its_own_order(pipeline):
    finished: list[str] = []

    async def scenario():
        batcher = ContinuousBatcher(pipeline.loop, max_batch_size=1, record=lambda n, s: None)

        async def one(tenant: str, seed: int, weight: float = 1.0) -> None:
            await batcher.submit(replace(job(10, (512, 512), 1, seed), tenant=TenantTag(tenant, weight)))
            finished.append(f"{tenant}{seed}")

        # all queued before the first step: a's flood first, then b's one job and c's two (weight 2)
        await asyncio.gather(*(one("a", i) for i in range(4)), one("b", 9), one("c", 7, 2.0), one("c", 8, 2.0))

    run(scenario())
    # equal start tags: the job that finishes first in virtual time goes first (c's, at twice the weight);
    # b's and c's jobs do not wait behind a's flood, and each tenant's jobs keep their order
    assert finished == ["c7", "a0", "b9", "c8", "a1", "a2", "a3"]
