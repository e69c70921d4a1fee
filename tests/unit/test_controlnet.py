"""ControlNet (deployments.denoiser.control) against diffusers' `ZImageControlNetPipeline` and
`ZImageControlNetInpaintPipeline` on the tiny checkpoint with the tiny ControlNet (float32, CPU),
and the batching rule: controlled and uncontrolled jobs, at any scales, share a step batch.

Every comparison runs diffusers itself in this process; tolerance one step of 255 per pixel channel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.denoiser.control import ControlContext, control_context, unified_length
from deployments.denoiser.loop import DenoiseLoop
from deployments.local_pipeline import GenerationSpec, LocalPipeline
from deployments.weights.controlnet_source import (
    TINY_CONTROLNET_CONFIG,
    ensure_tiny_controlnet,
    resolve_controlnet,
)
from deployments.weights.model_source import ModelSourceError
from tests.diffusers_reference import controlnet_reference
from tests.unit.test_inpaint import blob_mask, rect_mask
from tests.unit.test_parity import MAX_PIXEL_DIFF, make_photo, pixels

CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="session")
def controlled(tiny_source, tiny_controlnet) -> LocalPipeline:
    return LocalPipeline(tiny_source, CPU, F32, controlnet=tiny_controlnet)


def edges(width: int, height: int, seed: int) -> Image.Image:
    """A control image as a canny map looks: thin white lines on black."""
    rng = np.random.default_rng(seed)
    values = np.zeros((height, width), np.uint8)
    for _ in range(6):
        if rng.random() < 0.5:
            values[int(rng.integers(0, height)), :] = 255
        else:
            values[:, int(rng.integers(0, width))] = 255
    return Image.fromarray(values).convert("RGB")


CONTROL_CASES = [  # width, height, steps, scale, seed, guidance
    (512, 512, 4, 0.75, 3, 0.0),
    (640, 512, 3, 0.4, 5, 0.0),
    (512, 640, 3, 1.0, 8, 2.5),
]


@pytest.mark.parametrize("width,height,steps,scale,seed,guidance", CONTROL_CASES, ids=lambda v: str(v))
def test_control_matches_diffusers(controlled, diffusers_control, width, height, steps, scale, seed, guidance):
    control = edges(width, height, seed)
    spec = GenerationSpec("a red boat on a lake", width, height, steps=steps, seed=seed, control_image=control,
                          control_scale=scale, guidance_scale=guidance, negative_prompt="fog" if guidance else "")
    ours = pixels(controlled.generate([spec])[0])
    ref = diffusers_control(
        spec.prompt, control_image=control, controlnet_conditioning_scale=scale, width=width, height=height,
        num_inference_steps=steps, guidance_scale=guidance, negative_prompt=spec.negative_prompt or None,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    assert np.abs(ours - pixels(ref)).max() <= MAX_PIXEL_DIFF
    plain = pixels(controlled.generate([GenerationSpec(spec.prompt, width, height, steps=steps, seed=seed,
                                                       guidance_scale=guidance,
                                                       negative_prompt=spec.negative_prompt)])[0])
    assert np.abs(ours - plain).max() > 10  # the control changed the image: the comparison can fail


@pytest.mark.parametrize("width,height,steps,scale,seed", [(512, 512, 4, 0.75, 4), (640, 512, 3, 0.9, 6)],
                         ids=lambda v: str(v))
def test_control_with_a_mask_matches_diffusers_inpaint(controlled, diffusers_control_inpaint, width, height, steps,
                                                       scale, seed):
    init, mask, control = make_photo(width, height, seed), blob_mask(width, height, seed), edges(width, height, seed)
    spec = GenerationSpec("a red boat", width, height, steps=steps, seed=seed, init_image=init, mask=mask,
                          control_image=control, control_scale=scale, keep_unmasked=False)  # diffusers pastes nothing
    ours = pixels(controlled.generate([spec])[0])
    ref = diffusers_control_inpaint(
        spec.prompt, image=init, mask_image=mask, control_image=control, controlnet_conditioning_scale=scale,
        width=width, height=height, num_inference_steps=steps, guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    assert np.abs(ours - pixels(ref)).max() <= MAX_PIXEL_DIFF
    unmasked = GenerationSpec(spec.prompt, width, height, steps=steps, seed=seed, control_image=control,
                              control_scale=scale)
    assert np.abs(ours - pixels(controlled.generate([unmasked])[0])).max() > 10  # the mask entered


def test_a_controlnet_without_mask_channels_controls_as_diffusers_and_refuses_a_mask(tiny_source, diffusers_t2i,
                                                                                      cache_dir):
    """Union 1.0's layout (16 control channels): the control latents alone, as diffusers feeds them;
    a mask has no channels to enter, so the Denoiser's runner refuses it (the Ingress refuses such an
    edit earlier, with a 400: tests/integration/test_controlnet.py)."""
    from deployments.contracts import ControlLatents

    source = resolve_controlnet(str(ensure_tiny_controlnet(cache_dir, mask_channels=False)))
    local = LocalPipeline(tiny_source, CPU, F32, controlnet=source)
    assert local.control.in_dim == 16 and not local.control.takes_mask
    reference = controlnet_reference(diffusers_t2i, source.location)
    control = edges(512, 512, 2)
    spec = GenerationSpec("a red boat on a lake", 512, 512, steps=3, seed=2, control_image=control, control_scale=0.8)
    ours = pixels(local.generate([spec])[0])
    ref = reference(spec.prompt, control_image=control, controlnet_conditioning_scale=0.8, width=512, height=512,
                    num_inference_steps=3, guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(2)).images[0]
    assert np.abs(ours - pixels(ref)).max() <= MAX_PIXEL_DIFF
    plain = pixels(local.generate([GenerationSpec(spec.prompt, 512, 512, steps=3, seed=2)])[0])
    assert np.abs(ours - plain).max() > 10  # the control changed the image
    latents = ControlLatents(control=torch.randn(1, 16, 64, 64), masked_image=torch.randn(1, 16, 64, 64))
    with pytest.raises(ValueError, match="cannot inpaint"):
        local.control.context(latents, 0.75, torch.ones(1, 1, 64, 64))


def test_controlled_and_plain_jobs_share_a_step_batch(controlled):
    """One batched forward (not one call per job) over a plain job, two controlled ones at other
    scales and sizes, and a guided one: each image within a pixel step of its run alone."""
    specs = [
        GenerationSpec("a boat", 512, 512, steps=3, seed=1),
        GenerationSpec("a boat", 512, 512, steps=3, seed=1, control_image=edges(512, 512, 1), control_scale=0.8),
        GenerationSpec("a cat", 640, 512, steps=3, seed=2, control_image=edges(640, 512, 2), control_scale=0.3),
        GenerationSpec("a cat", 512, 512, steps=3, seed=3, guidance_scale=2.0, negative_prompt="fog",
                       control_image=edges(512, 512, 3)),
    ]
    alone = [pixels(controlled.generate([spec])[0]) for spec in specs]
    loop = controlled.loop
    batched = DenoiseLoop(loop.transformer, loop.schedules._scheduler, CPU, F32, batch_invariant=False,
                          control=controlled.control)
    controlled.loop, original = batched, loop
    try:
        together = [pixels(image) for image in controlled.generate(specs)]
    finally:
        controlled.loop = original
    for mine, theirs in zip(together, alone):
        assert np.abs(mine - theirs).max() <= MAX_PIXEL_DIFF
    assert np.abs(alone[0] - alone[1]).max() > 10  # same seed and prompt: the control changed it


def test_adapters_and_control_on_different_rows_of_one_batch(controlled, tmp_path):
    """LoRA adapters with control in one step batch: the ControlNet runs the transformer's refiners on
    the controlled rows only, with those rows' adapters; each image as alone."""
    from deployments.denoiser.lora.adapter import LoraAdapter
    from deployments.denoiser.lora.random_adapters import random_factors

    slots = controlled.loop.lora_slots
    transformer = controlled.loop.transformer
    ink = slots.lay_out(LoraAdapter("ink", random_factors(transformer, rank=4, seed=7, strength=0.3)))
    specs = [
        GenerationSpec("a boat", 512, 512, steps=2, seed=1, loras=((ink, 0.8),)),
        GenerationSpec("a cat", 512, 512, steps=2, seed=2, control_image=edges(512, 512, 2), control_scale=0.7),
        GenerationSpec("a cow", 512, 512, steps=2, seed=3, loras=((ink, -0.5),), control_image=edges(512, 512, 3)),
    ]
    alone = [pixels(controlled.generate([spec])[0]) for spec in specs]
    loop = controlled.loop
    controlled.loop = DenoiseLoop(loop.transformer, loop.schedules._scheduler, CPU, F32, batch_invariant=False,
                                  control=controlled.control)
    try:
        together = [pixels(image) for image in controlled.generate(specs)]
    finally:
        controlled.loop = loop
    for mine, theirs in zip(together, alone):
        assert np.abs(mine - theirs).max() <= MAX_PIXEL_DIFF


def test_uncontrolled_rows_get_zero_hints_and_scales_apply_per_row(controlled):
    runner = controlled.control
    torch.manual_seed(0)
    latents = [torch.randn(16, 1, 64, 64), torch.randn(16, 1, 64, 80), torch.randn(16, 1, 64, 64)]
    captions = [torch.randn(7, 64), torch.randn(40, 64), torch.randn(7, 64)]
    context = control_context(torch.randn(1, 16, 64, 64), runner.in_dim)
    t = torch.tensor([0.3, 0.5, 0.3])
    controls = [ControlContext(context, 0.5), None, ControlContext(context, 1.0)]
    hints = runner.hints(latents, t, captions, controls)
    assert set(hints) == set(TINY_CONTROLNET_CONFIG["control_layers_places"])
    lengths = [unified_length(x, c) for x, c in zip(latents, captions)]
    for row in (0, 2):  # each controlled row as its own run at its own scale gives
        alone = runner.hints([latents[row]], t[row : row + 1], [captions[row]], [controls[row]])
        for layer, hint in hints.items():
            assert torch.allclose(hint[row, : lengths[row]], alone[layer][0], atol=1e-5)
    for hint in hints.values():
        assert hint.shape[:2] == (3, max(lengths))
        assert not hint[1].any()  # the uncontrolled row: zeros, which leave its residual stream as it is
        assert not torch.allclose(hint[0], hint[2], atol=1e-3)  # same inputs, other scales: other hints


def test_control_context_layouts():
    latents = torch.randn(1, 16, 8, 10)
    plain = control_context(latents, 33)
    assert plain.shape == (33, 1, 8, 10) and torch.equal(plain[:16, 0], latents[0]) and not plain[16:].any()
    keep, masked = torch.ones(1, 1, 8, 10), torch.randn(1, 16, 8, 10)
    both = control_context(latents, 33, keep, masked)
    assert torch.equal(both[16, 0], keep[0, 0]) and torch.equal(both[17:, 0], masked[0])
    assert control_context(latents, 16).shape == (16, 1, 8, 10)
    with pytest.raises(ValueError, match="control channels"):
        control_context(latents, 16, keep, masked)


def test_controlnet_setting(tmp_path, cache_dir):
    assert resolve_controlnet("random").kind == "random"
    assert resolve_controlnet("someone/Some-ControlNet").location == "someone/Some-ControlNet"
    tiny = ensure_tiny_controlnet(cache_dir)
    assert resolve_controlnet(str(tiny)).location == str(tiny.resolve())
    with pytest.raises(ModelSourceError, match="config.json"):
        resolve_controlnet(str(tmp_path))
    with pytest.raises(ModelSourceError, match="unknown controlnet"):
        resolve_controlnet("not a model")


def test_the_stages_control_as_the_local_pipeline(controlled, tiny_source):
    """The request path (plan, VAE's encode_control, Denoiser with the ControlNet) over the real stage
    classes as plain objects: a controlled generation and a controlled inpainting edit give the local
    pipeline's images."""
    import asyncio
    import io

    from deployments.denoiser.deployment import Denoiser
    from deployments.style.deployment import PromptStyler
    from deployments.text_encoder.deployment import TextEncoder
    from deployments.vae.deployment import VaeDecoder
    from serve_app.config import ApiLimits
    from serve_app.pipeline import ImagePipeline, plan_request
    from serve_app.protocol import ImageEditRequest, ImageGenerationRequest
    from tests.stand_ins import LocalHandle, close_all

    settings = {"model": "tiny", "device": "cpu", "cache_dir": str(tiny_source.location).rsplit("/", 1)[0],
                "controlnet": "tiny"}
    loop = asyncio.new_event_loop()
    try:
        stages = {"styler": LocalHandle(PromptStyler.func_or_class()),
                  "text_encoder": LocalHandle(TextEncoder.func_or_class(settings)),
                  "denoiser": LocalHandle(Denoiser.func_or_class(settings)),
                  "vae": LocalHandle(VaeDecoder.func_or_class(settings))}
        control, init, mask = edges(512, 512, 2), make_photo(512, 512, 2), rect_mask(512, 512, (64, 64, 320, 400))
        generation = ImageGenerationRequest(prompt="a koi pond", size="512x512", seed=4, num_inference_steps=2,
                                            control_scale=0.5)
        edit = ImageEditRequest(prompt="a koi pond", seed=5, num_inference_steps=2)
        plans = [plan_request(generation, None, ApiLimits(), "tiny", control=control),
                 plan_request(edit, init, ApiLimits(), "tiny", mask, control=control)]
        results = [loop.run_until_complete(ImagePipeline(**stages, random_weights=True).run(plan)) for plan in plans]
        loop.run_until_complete(close_all(stages.values()))
    finally:
        loop.close()
    expected = controlled.generate([
        GenerationSpec("a koi pond", 512, 512, steps=2, seed=4, control_image=control, control_scale=0.5),
        GenerationSpec("a koi pond", 512, 512, steps=2, seed=5, init_image=init, mask=mask, control_image=control),
    ])
    assert stages["vae"].calls.count("encode_control") == 2 and "encode" not in stages["vae"].calls
    for result, want in zip(results, expected):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(result.images[0].data))), pixels(want))
