"""The contracts between stages: a Denoiser job built from its request, and an image's trace."""

from __future__ import annotations

import time
from dataclasses import fields

import pytest
import torch

from deployments.contracts import (
    CaptionEmbedding,
    DenoiseJob,
    DenoiseRequest,
    ImageTrace,
    LatentPosterior,
    LoraRef,
    StageTime,
    TenantTag,
)
from serve_app.protocol import Timings


def _caption(tokens: int) -> CaptionEmbedding:
    return CaptionEmbedding(embedding=torch.randn(tokens, 8), num_tokens=tokens, truncated=False)


def _posterior() -> LatentPosterior:
    return LatentPosterior(mean=torch.zeros(1, 16, 4, 4), std=torch.ones(1, 16, 4, 4), shift_factor=0.1,
                           scaling_factor=0.3)


def _request_with_every_field_set() -> DenoiseRequest:
    """A request whose every field differs from its default, so a field the job lost would show."""
    return DenoiseRequest(width=640, height=384, steps=5, seed=11, guidance_scale=2.5, strength=0.4,
                          mask=torch.ones(1, 1, 48, 80), deadline=time.time() + 60, loras=(LoraRef("ink", 0.5),),
                          control_scale=0.6, tenant=TenantTag("team-a", 2.0))


def test_the_request_sets_no_field_to_its_default():
    request = _request_with_every_field_set()
    defaults = DenoiseRequest(width=0, height=0, steps=0, seed=0)
    assert [f.name for f in fields(request) if getattr(request, f.name) is getattr(defaults, f.name)] == []


def test_a_job_carries_every_field_of_its_request_and_its_conditioning():
    request, caption, negative, posterior = _request_with_every_field_set(), _caption(7), _caption(3), _posterior()
    adapters = ((object(), 0.5),)
    job = DenoiseJob.from_request(request, caption, negative, posterior, on_step=print, adapters=adapters)
    for f in fields(DenoiseRequest):
        assert getattr(job, f.name) is getattr(request, f.name), f.name
    assert job.caption is caption.embedding and job.negative_caption is negative.embedding
    assert job.init_posterior is posterior and job.is_image_to_image and job.on_step is print
    assert job.adapters is adapters


def test_a_controlled_job_starts_from_noise_with_its_mask_in_the_control():
    """With a mask, the ControlNet inpaints through its control channels (ZImageControlNetInpaintPipeline):
    the job keeps no mask to blend and takes no upload as its start."""
    request, control = _request_with_every_field_set(), object()
    job = DenoiseJob.from_request(request, _caption(4), control=control)
    assert job.control is control and job.mask is None and job.control_scale == 0.6 and not job.is_image_to_image
    with pytest.raises(ValueError, match="starts from noise"):
        DenoiseJob.from_request(request, _caption(4), posterior=_posterior(), control=control)


def test_without_an_upload_a_job_runs_every_step():
    """`strength` skips the noisiest steps of an image-to-image schedule; a text-to-image job keeps 1.0
    whatever the request says."""
    job = DenoiseJob.from_request(_request_with_every_field_set(), _caption(4))
    assert (job.strength, job.negative_caption, job.init_posterior, job.is_image_to_image) == (1.0, None, None, False)


def test_a_stage_time_is_its_milliseconds_since_arrival():
    start = time.perf_counter() - 0.25
    stage = StageTime.since(start, queued_s=0.1)
    assert 250 <= stage.ms < 1000 and stage.queue_ms == 100.0
    assert stage + StageTime(1.5, 0.5) == StageTime(round(stage.ms + 1.5, 2), 100.5)


def test_a_trace_joins_the_stages_each_result_timed():
    caption = ImageTrace(encode=StageTime(4.0, 1.0))
    upload = ImageTrace(image_encode=StageTime(9.0, 2.0))
    joined = caption.joined(upload)
    assert (joined.encode, joined.image_encode, joined.denoise) == (StageTime(4.0, 1.0), StageTime(9.0, 2.0),
                                                                    StageTime())
    assert upload.joined(caption) == joined  # each side timed different stages


def test_a_trace_names_the_response_timings_fields():
    """Every stage of the trace is a `<stage>_ms` and `<stage>_queue_ms` pair of the response's
    `timings`: a stage added to one and not the other fails here."""
    trace = ImageTrace(encode=StageTime(1, 0.5), image_encode=StageTime(2, 1), denoise=StageTime(3, 1.5),
                       decode=StageTime(4, 2))
    request_wide = {"total_ms", "style_ms", "output_encode_ms"}
    assert set(trace.as_ms()) == set(Timings.model_fields) - request_wide
    timings = Timings(total_ms=20, style_ms=0.1, output_encode_ms=0.2, **trace.as_ms())
    assert (timings.denoise_ms, timings.denoise_queue_ms, timings.image_encode_ms) == (3, 1.5, 2)


def test_a_job_still_needs_its_caption():
    with pytest.raises(TypeError, match="caption"):
        DenoiseJob(width=512, height=512, steps=2, seed=0)
