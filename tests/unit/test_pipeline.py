"""The request path (serve_app.pipeline) with in-process stand-ins for the stage handles.

The stages are the real deployment classes on the tiny checkpoint (CPU), called as plain objects;
the images must equal those of the one-process LocalPipeline, which the parity tests tie to diffusers.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from deployments.local_pipeline import GenerationSpec
from deployments.denoiser.deployment import Denoiser
from deployments.style.deployment import PromptStyler
from deployments.text_encoder.deployment import TextEncoder
from deployments.vae.deployment import VaeDecoder
from serve_app.config import ApiLimits
from serve_app.errors import ApiError
from serve_app.pipeline import ImagePipeline, plan_request
from serve_app.protocol import ImageEditRequest, ImageGenerationRequest
from tests.stand_ins import LocalHandle, close_all


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: the stages' batchers keep a task on the loop they started on."""
    loop = asyncio.new_event_loop()
    yield loop
    # `stages` stopped its batchers' tasks: none is left pending, to be reported destroyed when collected
    assert not [task for task in asyncio.all_tasks(loop) if not task.done()]
    loop.close()


@pytest.fixture(scope="module")
def stages(tiny_source, loop):
    settings = {"model": "tiny", "device": "cpu", "cache_dir": str(tiny_source.location).rsplit("/", 1)[0]}
    handles = {
        "styler": LocalHandle(PromptStyler.func_or_class()),
        "text_encoder": LocalHandle(TextEncoder.func_or_class(settings)),
        "denoiser": LocalHandle(Denoiser.func_or_class(settings)),
        "vae": LocalHandle(VaeDecoder.func_or_class(settings)),
    }
    yield handles
    loop.run_until_complete(close_all(handles.values()))  # before the loop closes


def run(loop, stages, request, init=None):
    plan = plan_request(request, init, ApiLimits(), "tiny")
    return loop.run_until_complete(ImagePipeline(**stages, random_weights=True).run(plan))


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_generation_runs_every_stage_and_equals_the_local_pipeline(loop, stages, pipeline):
    request = ImageGenerationRequest(prompt="a koi pond", size="512x512", n=2, seed=9, num_inference_steps=3,
                                     style="Watercolor")
    result = run(loop, stages, request)
    assert [image.seed for image in result.images] == [9, 10]
    assert stages["denoiser"].calls[-2:] == ["denoise", "denoise"] and stages["text_encoder"].calls[-1] == "encode"
    for image in result.images:
        spec = GenerationSpec("a koi pond", 512, 512, steps=3, seed=image.seed, style="Watercolor")
        expected = pipeline.generate([spec])[0].pixels.numpy()
        assert np.array_equal(decoded(image.data), expected)
    assert result.timings.denoise_ms > 0 and result.timings.decode_ms > 0 and result.timings.encode_ms > 0
    assert result.random_weights is True


def test_edit_encodes_the_upload_once_for_all_images(loop, stages, pipeline):
    upload = Image.fromarray(np.random.default_rng(1).integers(0, 255, (400, 600, 3), dtype=np.uint8))
    calls_before = stages["vae"].calls.count("encode")
    request = ImageEditRequest(prompt="as a watercolor", n=2, seed=3, num_inference_steps=4, strength=0.5)
    result = run(loop, stages, request, upload)
    assert stages["vae"].calls.count("encode") - calls_before == 1
    assert (result.images[0].width, result.images[0].height) == (768, 512)
    fitted = upload.resize((768, 512), Image.Resampling.LANCZOS)
    spec = GenerationSpec("as a watercolor", 768, 512, steps=4, seed=3, init_image=fitted, strength=0.5)
    assert np.array_equal(decoded(result.images[0].data), pipeline.generate([spec])[0].pixels.numpy())
    assert result.timings.image_encode_ms > 0


def test_plan_refuses_what_the_limits_do_not_allow():
    limits = ApiLimits(max_images_per_request=2)
    with pytest.raises(ApiError, match="n must be at most 2"):
        plan_request(ImageGenerationRequest(prompt="x", n=3), None, limits, "tiny")
    with pytest.raises(ApiError, match="multiple of 16"):
        plan_request(ImageGenerationRequest(prompt="x", size="520x512"), None, limits, "tiny")
    with pytest.raises(ApiError) as error:  # the whole rule, whichever part the size breaks
        plan_request(ImageGenerationRequest(prompt="x", size="100x100"), None, ApiLimits(max_pixels=1536 * 1536),
                     "tiny")
    assert str(error.value).startswith("Invalid size '100x100': width 100 is not a multiple of 16. A size is "
                                       "WIDTHxHEIGHT with each side a multiple of 16 within 512..2048 and at most "
                                       "2359296 pixels in all, such as the presets 1024x1024, 1344x768")
    assert "1536x1536" in str(error.value) and "2048x1536" not in str(error.value)  # the presets under the cap
    with pytest.raises(ApiError) as error:
        plan_request(ImageGenerationRequest(prompt="x", model="dall-e-3"), None, limits, "tiny")
    assert error.value.status == 404
