"""Stage code details: token cap reporting, schedules, strength, image fitting."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from deployments.contracts import DenoiseJob
from deployments.denoiser.loop import first_step_index
from deployments.geometry import latent_shape
from deployments.geometry import SIZE_PRESETS, fit_upload, fitted_size, size_problem


def test_long_prompt_truncation_is_reported_not_silent(pipeline):
    long_prompt = " ".join(["a very detailed castle floating above the clouds"] * 80)
    short, long = pipeline.encoder.encode(["a cat", long_prompt])
    assert not short.truncated and short.dropped_tokens == 0
    assert long.truncated and long.num_tokens == 512 and long.dropped_tokens > 0
    assert long.embedding.shape == (512, 64)


def test_batched_encoding_equals_encoding_alone(pipeline):
    prompts = ["a", "a cyberpunk street market in the rain, film grain", "一只猫"]
    together = pipeline.encoder.encode(prompts)
    for prompt, item in zip(prompts, together):
        alone = pipeline.encoder.encode([prompt])[0]
        assert item.embedding.shape == alone.embedding.shape
        assert torch.equal(item.embedding, alone.embedding)  # the CPU default is batch-invariant


def test_strength_picks_the_first_step_as_diffusers_does():
    assert first_step_index(8, 0.6) == 3
    assert first_step_index(8, 1.0) == 0
    assert first_step_index(4, 0.1) == 3


def test_strength_that_leaves_no_step_is_an_error(pipeline):
    from deployments.contracts import LatentPosterior

    posterior = LatentPosterior(torch.zeros(latent_shape(16, 512, 512)), torch.ones(latent_shape(16, 512, 512)), 0.1, 0.3)
    job = DenoiseJob(caption=torch.zeros(4, 64), width=512, height=512, steps=2, seed=0, init_posterior=posterior, strength=0.0)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        pipeline.loop.start(job)


@pytest.mark.parametrize("steps", [1, 2, 8, 16])
def test_any_step_count_runs_that_many_steps(pipeline, steps):
    job = DenoiseJob(caption=torch.randn(7, 64), width=512, height=512, steps=steps, seed=1)
    assert pipeline.loop.run([job])[0].steps_run == steps


def test_guidance_without_negative_caption_is_an_error(pipeline):
    job = DenoiseJob(caption=torch.randn(7, 64), width=512, height=512, steps=2, seed=1, guidance_scale=2.0)
    with pytest.raises(ValueError, match="negative caption"):
        pipeline.loop.start(job)


def test_size_rules():
    assert all(size_problem(w, h, 2048 * 2048) is None for w, h in SIZE_PRESETS)
    assert "multiple of 16" in size_problem(1000, 1024, 2048 * 2048)
    assert "outside 512..2048" in size_problem(256, 1024, 2048 * 2048)
    assert "over the cap" in size_problem(2048, 2048, 1536 * 1536)


@pytest.mark.parametrize(
    "source,expected",
    [((1024, 1024), (1024, 1024)), ((4000, 3000), (2048, 1536)), ((300, 200), (768, 512)),
     ((1000, 750), (992, 752)), ((5000, 500), (2048, 512))],
)
def test_uploads_are_fitted_keeping_aspect_ratio(source, expected):
    assert fitted_size(*source) == expected
    fitted = fit_upload(Image.new("RGBA", source, (10, 20, 30, 255)))
    assert fitted.size == expected and fitted.mode == "RGB"
    assert all(side % 16 == 0 and 512 <= side <= 2048 for side in fitted.size)
