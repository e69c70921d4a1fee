"""A replica that reports ready before its batched graphs are compiled: until the background warm-up
has run, every DiT forward carries one image (no batch shape compiles on the request path); after it,
batches run batched; either way a job gets the same latents; the warm-up's calls take turns with the
requests' steps on the one model thread and never overlap them."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from deployments.runtime.background_warmup import BackgroundWarmup
from deployments.contracts import DenoiseJob
from deployments.denoiser.loop import DenoiseLoop
from deployments.denoiser.dit import warmup
from deployments.runtime.gpu_lane import GpuLane
from deployments.denoiser.scheduling import ContinuousBatcher, run_grouped

CPU = torch.device("cpu")
F32 = torch.float32


def caption(length: int, seed: int) -> torch.Tensor:
    return torch.randn(length, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def jobs() -> list[DenoiseJob]:
    """One resolution (so the batcher puts them in one bucket), ragged captions, one guided job."""
    return [
        DenoiseJob(caption=caption(5, 1), width=512, height=512, steps=3, seed=1),
        DenoiseJob(caption=caption(70, 2), width=512, height=512, steps=2, seed=2),
        DenoiseJob(caption=caption(33, 3), width=512, height=512, steps=3, seed=3, guidance_scale=2.0,
                   negative_caption=caption(9, 30)),
        DenoiseJob(caption=caption(18, 4), width=512, height=512, steps=3, seed=4),
    ]


class Spy:
    """The DiT call, recording images per forward and checking that no two forwards overlap."""

    def __init__(self, transformer, log: list | None = None):
        self.transformer = transformer
        self.sizes: list[int] = []
        self.threads: set[int] = set()
        self.active = 0
        self.log = log if log is not None else []

    def __call__(self, latents, t, captions):
        self.active += 1
        assert self.active == 1, "two forwards at once"
        try:
            self.sizes.append(len(latents))
            self.threads.add(threading.get_ident())
            self.log.append("request")
            return self.transformer(latents, t, captions, return_dict=False)[0]
        finally:
            self.active -= 1


def loop_with(pipeline, spy: Spy, ready: threading.Event) -> DenoiseLoop:
    """What the GPU runs: batched forwards (`batch_invariant=False`), gated on `ready`."""
    base = pipeline.loop
    return DenoiseLoop(base.transformer, base.schedules._scheduler, CPU, F32, transformer_fn=spy,
                       batch_invariant=False, batched_ready=ready)


def through_batcher(loop: DenoiseLoop, lane: GpuLane, jobs: list[DenoiseJob]):
    sizes: list[int] = []

    async def scenario():
        batcher = ContinuousBatcher(loop, max_batch_size=8, record=lambda n, s: sizes.append(n), lane=lane)
        return await asyncio.gather(*(batcher.submit(j) for j in jobs))

    return asyncio.run(scenario()), sizes


def test_batches_run_one_image_per_forward_until_the_warm_up_is_done_then_batched_with_the_same_latents(
        pipeline, jobs):
    lane = GpuLane("test")
    warmed = []
    background = BackgroundWarmup(lane, [("b2", lambda: warmed.append("b2"))])
    spy = Spy(pipeline.loop.transformer)
    loop = loop_with(pipeline, spy, background.ready)
    assert not loop.batched_forwards()

    split, step_sizes = through_batcher(loop, lane, jobs)
    assert max(step_sizes) == 4  # the scheduler still steps the four jobs together
    assert set(spy.sizes) == {1}  # but each image (and the guided job's negative pass) is its own forward
    guided_steps = len(loop.schedules.for_job(jobs[2]).timesteps)
    assert len(spy.sizes) == sum(len(loop.schedules.for_job(j).timesteps) for j in jobs) + guided_steps

    background.start()
    assert background.wait(10) and warmed == ["b2"] and loop.batched_forwards()
    spy.sizes.clear()
    batched, _ = through_batcher(loop, lane, jobs)
    assert max(spy.sizes) == 5  # four images and the guided job's negative pass in one forward

    alone = [pipeline.loop.run([job])[0] for job in jobs]  # the CPU default: one call per job
    split_images, batched_images = pipeline.codec.decode(split), pipeline.codec.decode(batched)
    for job, s, b, a, s_image, b_image in zip(jobs, split, batched, alone, split_images, batched_images):
        if job.guidance_scale == 0:  # the very call it gets alone
            assert torch.equal(s.latents, a.latents)
        assert (s.latents - b.latents).norm() / b.latents.norm() < 1e-5
        assert np.abs(s_image.pixels.numpy().astype(int) - b_image.pixels.numpy().astype(int)).max() <= 1


def test_the_warm_up_takes_turns_with_requests_on_the_model_thread(pipeline, jobs):
    lane = GpuLane("test")
    log: list[str] = []
    spy = Spy(pipeline.loop.transformer, log)
    warm_threads = set()

    def warm_call() -> None:
        spy.active += 1  # a warm-up forward: must not overlap a request's
        assert spy.active == 1, "two forwards at once"
        warm_threads.add(threading.get_ident())
        log.append("warm-up")
        time.sleep(0.03)
        spy.active -= 1

    background = BackgroundWarmup(lane, [(f"call{i}", warm_call) for i in range(6)])
    loop = loop_with(pipeline, spy, background.ready)
    long_jobs = [DenoiseJob(caption=caption(9, i), width=512, height=512, steps=6, seed=i) for i in range(3)]

    async def scenario():
        batcher = ContinuousBatcher(loop, max_batch_size=8, record=lambda n, s: None, lane=lane)
        tasks = [asyncio.create_task(batcher.submit(j)) for j in long_jobs]
        while "request" not in log:  # requests under way, then the warm-up starts beside them
            await asyncio.sleep(0.005)
        background.start()
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert [r.steps_run for r in results] == [6, 6, 6]
    assert background.wait(10) and background.as_dict()["calls_done"] == 6
    assert warm_threads == spy.threads and len(spy.threads) == 1  # all on the lane's one thread
    first, last = log.index("warm-up"), len(log) - 1 - log[::-1].index("warm-up")
    assert "request" in log[first:last]  # requests' forwards ran between warm-up calls
    before_ready = spy.sizes[: log[: last + 1].count("request")]
    assert set(before_ready) == {1}


def test_a_failed_warm_up_call_leaves_batches_split(pipeline, jobs):
    def broken() -> None:
        raise RuntimeError("out of memory at batch 8")

    lane = GpuLane("test")
    background = BackgroundWarmup(lane, [("b8", broken), ("never", lambda: None)])
    background.start()
    background._thread.join(10)
    assert not background.ready.is_set()
    assert background.as_dict()["error"].startswith("b8: RuntimeError") and background.as_dict()["calls_done"] == 0
    spy = Spy(pipeline.loop.transformer)
    run_grouped(loop_with(pipeline, spy, background.ready), jobs[:2], lambda n, s: None)
    assert set(spy.sizes) == {1}


def test_nothing_to_warm_is_ready_at_once():
    reported = []
    background = BackgroundWarmup(GpuLane("test"), [], on_ready=reported.append)
    background.start()
    assert background.ready.is_set() and background.as_dict()["ready"] and not reported


def test_the_serving_warm_up_splits_into_batch_one_and_batched_calls():
    single, batched = warmup.serving_calls([(256, 256), 512], max_batch_size=4, max_caption_tokens=96)
    assert {c.batch for c in single} == {1} and {c.batch for c in batched} == {2, 4}
    assert {c.key for c in batched} == {"256x256/b2", "256x256/b2/ragged", "256x256/b4", "256x256/b4/ragged",
                                        "512x512/b2", "512x512/b2/ragged", "512x512/b4", "512x512/b4/ragged"}
    assert {c.key for c in single} >= {"256x256/b1", "256x256/b1/cap96", "512x512/b1", "512x512/b1/cap32"}
    ragged = next(c for c in batched if c.key == "256x256/b4/ragged")
    assert len(set(ragged.caption_lens)) == 2


def test_the_denoiser_on_a_cpu_has_nothing_to_warm_later(cache_dir):
    from deployments.denoiser.deployment import Denoiser

    settings = {"model": "tiny", "device": "cpu", "cache_dir": str(cache_dir)}
    denoiser = Denoiser.func_or_class(settings)
    stats = denoiser.stats()
    assert stats["batched_graphs_ready"] and denoiser.loop.batched_forwards()
    assert stats["start_phases"]["warmup_after_ready_s"] == 0.0 and stats["state"] == "ready"
    assert stats["batched_warmup"]["calls"] == 0
    assert stats["shape_warmup"]["calls"] == 0 and stats["shape_warmup"]["ready"]  # plans and graphs: GPU only
