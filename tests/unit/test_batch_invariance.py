"""Batch invariance on the CPU: a request's result is bitwise the same alone or inside any batch.

CPU GEMM rounding depends on the row count, which a batched forward changes, so on the CPU the DiT
runs once per job and the text encoder once per prompt (`batch_invariant`, on by default there) while
admission, scheduling and stepping stay batched. The batched forward (`batch_invariant=False`, what
the GPU runs) is still checked here, against the tolerance it was always held to.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from deployments.weights import loading
from deployments.contracts import DenoiseJob, Latents
from deployments.denoiser.loop import DenoiseLoop
from deployments.denoiser.scheduling import ContinuousBatcher, run_grouped
from deployments.text_encoder.encoding import PromptEncoder
from deployments.settings import ModelSettings

CPU = torch.device("cpu")
F32 = torch.float32

# Token counts 14 to 314: together they pad to 384, alone to 32, 64, 256 or 384. On this CPU the
# 129..256-token prompts come out of a forward padded to 384 a little different than padded to 256.
PROMPTS = [
    "a",
    "a castle floating above the clouds, oil on canvas, dramatic shadows, golden hour, " * 3,
    "a desert canyon at noon",
    "一只猫在雪地里",
    "a red fox in fresh snow, " * 20,
    "an old lighthouse on a rocky coast at dusk, waves crashing below",
    "a very detailed castle floating above the clouds " * 30,
]


def caption(length: int, seed: int) -> torch.Tensor:
    return torch.randn(length, 64, generator=torch.Generator().manual_seed(seed))


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def jobs(pipeline) -> list[DenoiseJob]:
    """Two sizes, caption lengths across the DiT's 32-token padding, steps, seeds, guidance, an edit."""
    posterior = pipeline.codec.encode([photo(512, 512, 4)])[0]
    return [
        DenoiseJob(caption=caption(5, 1), width=512, height=512, steps=4, seed=1),
        DenoiseJob(caption=caption(70, 2), width=640, height=512, steps=2, seed=2),
        DenoiseJob(caption=caption(33, 3), width=512, height=512, steps=3, seed=3, guidance_scale=2.0,
                   negative_caption=caption(9, 30)),
        DenoiseJob(caption=caption(18, 4), width=512, height=512, steps=5, seed=4, init_posterior=posterior,
                   strength=0.5),
        DenoiseJob(caption=caption(64, 5), width=640, height=512, steps=3, seed=5, guidance_scale=4.0,
                   negative_caption=caption(40, 50)),
        DenoiseJob(caption=caption(12, 6), width=512, height=512, steps=1, seed=6),
    ]


@pytest.fixture(scope="module")
def alone(pipeline, jobs) -> list[Latents]:
    """Each job run by itself."""
    return [pipeline.loop.run([job])[0] for job in jobs]


@pytest.fixture(scope="module")
def scheduler(tiny_source):
    return loading.load_scheduler(tiny_source)


def test_the_cpu_defaults_to_batch_invariance(pipeline, scheduler):
    assert pipeline.loop.batch_invariant and pipeline.encoder.batch_invariant
    transformer, encoder = pipeline.loop.transformer, pipeline.encoder
    cuda = torch.device("cuda")  # only stored, never touched
    assert not DenoiseLoop(transformer, scheduler, cuda, torch.bfloat16).batch_invariant
    assert DenoiseLoop(transformer, scheduler, cuda, torch.bfloat16, batch_invariant=True).batch_invariant
    assert not DenoiseLoop(transformer, scheduler, CPU, F32, batch_invariant=False).batch_invariant
    assert not PromptEncoder(encoder.tokenizer, encoder.text_encoder, cuda).batch_invariant
    assert not PromptEncoder(encoder.tokenizer, encoder.text_encoder, CPU, batch_invariant=False).batch_invariant


def test_grouped_batches_give_each_job_exactly_its_latents_alone(pipeline, jobs, alone):
    sizes: list[int] = []
    results = run_grouped(pipeline.loop, jobs, lambda n, s: sizes.append(n))
    assert max(sizes) == 4  # the four 512x512 jobs stepped together
    for job, result, expected in zip(jobs, results, alone):
        assert result.steps_run == expected.steps_run == len(pipeline.loop.schedules.for_job(job).timesteps)
        assert torch.equal(result.latents, expected.latents)


def test_jobs_joining_a_running_continuous_batch_get_exactly_their_latents_alone(pipeline, jobs, alone):
    sizes: list[int] = []

    async def scenario():
        batcher = ContinuousBatcher(pipeline.loop, max_batch_size=8, record=lambda n, s: sizes.append(n))
        first = [asyncio.create_task(batcher.submit(j)) for j in jobs[:2]]
        while len(sizes) < 2:  # the first two are under way
            await asyncio.sleep(0.005)
        rest = [asyncio.create_task(batcher.submit(j)) for j in jobs[2:]]
        return await asyncio.gather(*first, *rest)

    results = asyncio.run(scenario())
    assert sizes[:2] == [1, 1] and max(sizes) >= 3  # the later jobs joined the first one's bucket
    for result, expected in zip(results, alone):
        assert torch.equal(result.latents, expected.latents)
    for image, expected in zip(pipeline.codec.decode(results), pipeline.codec.decode(alone)):
        assert torch.equal(image.pixels, expected.pixels)


def test_each_model_call_carries_one_job_and_its_negative_pass(pipeline, scheduler, jobs):
    calls: list[int] = []
    transformer = pipeline.loop.transformer

    def spy(latents, t, captions):
        assert len(latents) == len(t) == len(captions)
        calls.append(len(latents))
        return transformer(latents, t, captions, return_dict=False)[0]

    loop = DenoiseLoop(transformer, scheduler, CPU, F32, transformer_fn=spy)
    run_grouped(loop, jobs, lambda n, s: None)
    expected = []
    for job in jobs:
        expected += [2 if job.guidance_scale > 0 else 1] * len(loop.schedules.for_job(job).timesteps)
    assert sorted(calls) == sorted(expected)

    calls.clear()
    loop.batch_invariant = False
    run_grouped(loop, jobs, lambda n, s: None)
    assert max(calls) == 5  # four 512x512 jobs, one guided, in one forward


def test_prompts_encoded_together_equal_each_prompt_encoded_alone(pipeline):
    together = pipeline.encoder.encode(PROMPTS)
    lengths = [item.num_tokens for item in together]
    assert min(lengths) < 32 and 128 < sorted(lengths)[-2] <= 256 < max(lengths)  # several length buckets
    for prompt, item in zip(PROMPTS, together):
        single = pipeline.encoder.encode([prompt])[0]
        assert (item.num_tokens, item.truncated) == (single.num_tokens, single.truncated)
        assert torch.equal(item.embedding, single.embedding)


def test_each_text_encoder_forward_carries_one_prompt_padded_as_alone(pipeline):
    shapes: list[tuple[int, int]] = []
    text_encoder = pipeline.encoder.text_encoder

    def spy(input_ids, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return text_encoder(input_ids=input_ids, **kwargs)

    spy.config = text_encoder.config
    encoder = PromptEncoder(pipeline.encoder.tokenizer, spy, CPU)
    encoder.encode(PROMPTS)
    alone = list(shapes)
    shapes.clear()
    for prompt in PROMPTS:
        encoder.encode([prompt])
    assert alone == shapes and {rows for rows, _ in shapes} == {1}


def test_the_batched_forward_stays_within_the_old_tolerance(pipeline, scheduler, jobs, alone):
    """`batch_invariant=False` is the GPU's code path; on the CPU it agrees within float32 noise."""
    loop = DenoiseLoop(pipeline.loop.transformer, scheduler, CPU, F32, batch_invariant=False)
    for job, expected in zip(jobs, alone):  # alone, both modes make the same single call
        assert torch.equal(loop.run([job])[0].latents, expected.latents)
    results = run_grouped(loop, jobs, lambda n, s: None)
    batched_images, alone_images = pipeline.codec.decode(results), pipeline.codec.decode(alone)
    for result, expected, image, alone_image in zip(results, alone, batched_images, alone_images):
        assert (result.latents - expected.latents).norm() / expected.latents.norm() < 1e-5
        assert np.abs(image.pixels.numpy().astype(int) - alone_image.pixels.numpy().astype(int)).max() <= 1

    encoder = pipeline.encoder
    batched = PromptEncoder(encoder.tokenizer, encoder.text_encoder, CPU, batch_invariant=False)
    for prompt, item in zip(PROMPTS, batched.encode(PROMPTS)):
        single = encoder.encode([prompt])[0]
        assert item.embedding.shape == single.embedding.shape
        assert torch.allclose(item.embedding, single.embedding, atol=1e-5)


def test_the_setting_flows_from_app_args_to_the_stages(cache_dir):
    from deployments.denoiser.deployment import Denoiser
    from deployments.text_encoder.deployment import TextEncoder
    from serve_app.config import AppArgs

    assert ModelSettings().batch_invariant is None
    with pytest.raises(ValidationError):
        ModelSettings(batch_invariant="sometimes")
    base = {"model": "tiny", "device": "cpu", "cache_dir": str(cache_dir)}
    for value, expected in ((None, True), ("false", False), (True, True)):
        args = AppArgs.from_args({**base, **({} if value is None else {"batch_invariant": value})})
        settings = args.model_settings().model_dump()  # what the builder binds to each stage
        assert settings["batch_invariant"] == (None if value is None else expected)
        assert Denoiser.func_or_class(settings).loop.batch_invariant is expected
        assert TextEncoder.func_or_class(settings).encoder.batch_invariant is expected
