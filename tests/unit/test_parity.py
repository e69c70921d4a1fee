"""The composed stages compute what diffusers' Z-Image pipelines compute (tiny checkpoint, float32, CPU).

Every comparison runs diffusers itself in the same process on the same checkpoint; nothing is
compared against stored numbers. Tolerance: one step of 255 in any pixel channel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.local_pipeline import GenerationSpec

MAX_PIXEL_DIFF = 1


def pixels(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image).astype(np.int16)
    return image.pixels.numpy().astype(np.int16)


def reference_t2i(pipe, spec: GenerationSpec) -> np.ndarray:
    image = pipe(
        spec.prompt,
        width=spec.width,
        height=spec.height,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        negative_prompt=spec.negative_prompt or None,
        generator=torch.Generator("cpu").manual_seed(spec.seed),
    ).images[0]
    return pixels(image)


T2I_CASES = [
    GenerationSpec("a red fox in fresh snow, highly detailed", 512, 512, steps=8, seed=0),
    GenerationSpec("An old lighthouse on a rocky coast at dusk, waves crashing below", 768, 512, steps=4, seed=7),
    GenerationSpec("cat", 512, 640, steps=3, seed=123456789),
    GenerationSpec("a koi pond in autumn 秋天的锦鲤池", 528, 784, steps=6, seed=2**31 + 5),
    GenerationSpec("a bowl of ramen with steam", 640, 640, steps=1, seed=42),
]


@pytest.mark.parametrize("spec", T2I_CASES, ids=lambda s: f"{s.width}x{s.height}-{s.steps}steps-seed{s.seed}")
def test_text_to_image_matches_diffusers(pipeline, diffusers_t2i, spec):
    ours = pixels(pipeline.generate([spec])[0])
    ref = reference_t2i(diffusers_t2i, spec)
    assert ours.shape == ref.shape == (spec.height, spec.width, 3)
    assert np.abs(ours - ref).max() <= MAX_PIXEL_DIFF


def test_guidance_with_negative_prompt_matches_diffusers(pipeline, diffusers_t2i):
    spec = GenerationSpec("a glass teapot", 512, 512, steps=4, seed=3, guidance_scale=3.5, negative_prompt="blurry")
    assert np.abs(pixels(pipeline.generate([spec])[0]) - reference_t2i(diffusers_t2i, spec)).max() <= MAX_PIXEL_DIFF


def make_photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, non-trivial test image (gradients plus a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 255
    noisy = base + rng.normal(0, 12, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    "width,height,steps,strength,seed",
    [(512, 512, 8, 0.6, 11), (640, 512, 4, 1.0, 12), (512, 768, 6, 0.35, 13)],
)
def test_image_to_image_matches_diffusers(pipeline, diffusers_i2i, width, height, steps, strength, seed):
    init = make_photo(width, height, seed)
    spec = GenerationSpec("a watercolor map", width, height, steps=steps, seed=seed, init_image=init, strength=strength)
    ours = pixels(pipeline.generate([spec])[0])
    ref = diffusers_i2i(
        spec.prompt,
        image=init,
        strength=strength,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    assert np.abs(ours - pixels(ref)).max() <= MAX_PIXEL_DIFF


def test_mixed_batch_gives_each_job_its_own_image(pipeline):
    """Different sizes, caption lengths, steps, seeds, guidance and an edit, all in one batch."""
    specs = [
        GenerationSpec("a", 512, 512, steps=4, seed=1),
        GenerationSpec("a castle floating above the clouds, oil on canvas, dramatic shadows", 640, 512, steps=2, seed=2),
        GenerationSpec("a desert canyon", 512, 512, steps=4, seed=3, guidance_scale=2.0, negative_prompt="fog"),
        GenerationSpec("edit me", 512, 512, steps=5, seed=4, init_image=make_photo(512, 512, 4), strength=0.5),
    ]
    together = pipeline.generate(specs)
    for spec, batched in zip(specs, together):
        alone = pipeline.generate([spec])[0]
        assert np.abs(pixels(batched) - pixels(alone)).max() <= MAX_PIXEL_DIFF


def test_seed_determines_the_image(pipeline):
    a, b, c = pipeline.generate(
        [GenerationSpec("same", 512, 512, steps=2, seed=5)] * 2 + [GenerationSpec("same", 512, 512, steps=2, seed=6)]
    )
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).max() > 10


def test_tiled_decode_matches_diffusers_tiling(pipeline, diffusers_t2i):
    """Above the tiling threshold both sides decode in overlapping tiles; the results agree."""
    spec = GenerationSpec("a field of sunflowers", 1152, 1088, steps=1, seed=9)
    assert pipeline.codec.needs_tiling(spec.width, spec.height)
    diffusers_t2i.vae.enable_tiling()
    try:
        ref = reference_t2i(diffusers_t2i, spec)
    finally:
        diffusers_t2i.vae.disable_tiling()
    assert np.abs(pixels(pipeline.generate([spec])[0]) - ref).max() <= MAX_PIXEL_DIFF
