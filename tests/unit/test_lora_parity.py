"""LoRA on tiny (float32, CPU): our unmerged, batched update against diffusers' ZImagePipeline after
`load_lora_weights` + `set_adapters`, and a job's image in a batch with other adapters against alone.

Adapter files are random (both the diffusers format and the kohya trainer format, which diffusers
converts) and written to a temporary directory; nothing is downloaded.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from deployments.denoiser.dit.fusion import fuse_projections
from deployments.denoiser.dit.rotary import install_real_rope
from deployments.denoiser.lora.library import LoraLibrary, LoraSettings
from deployments.denoiser.lora.slots import install_lora
from deployments.denoiser.loop import DenoiseLoop
from deployments.local_pipeline import GenerationSpec
from deployments.weights import loading
from tests.diffusers_reference import quiet
from deployments.denoiser.lora.random_adapters import diffusers_state, kohya_state, random_factors, write
from tests.unit.test_parity import MAX_PIXEL_DIFF, pixels

CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, pipeline):
    directory = tmp_path_factory.mktemp("loras")
    transformer = pipeline.loop.transformer
    write(directory, "painterly", diffusers_state(random_factors(transformer, rank=4, seed=1)))
    write(directory, "sketch", kohya_state(random_factors(transformer, rank=8, seed=2), alpha=4.0))
    write(directory, "attn_only", diffusers_state(random_factors(
        transformer, rank=2, seed=3, targets=("attention.to_q", "attention.to_v"))))
    return directory


@pytest.fixture(scope="module")
def adapters(lora_dir, pipeline):
    library = LoraLibrary(LoraSettings(lora_dir=str(lora_dir)))
    slots = pipeline.loop.lora_slots
    return {name: slots.lay_out(library.load(name)[0]) for name in library.names()}


def reference(tiny_source, lora_dir, names, scales, spec: GenerationSpec) -> np.ndarray:
    from diffusers import ZImagePipeline

    pipe = quiet(ZImagePipeline.from_pretrained(tiny_source.location, torch_dtype=F32))
    for name in names:
        pipe.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name)
    pipe.set_adapters(list(names), list(scales))
    image = pipe(spec.prompt, width=spec.width, height=spec.height, num_inference_steps=spec.steps,
                 guidance_scale=spec.guidance_scale, negative_prompt=spec.negative_prompt or None,
                 generator=torch.Generator("cpu").manual_seed(spec.seed)).images[0]
    return pixels(image)


CASES = [  # (adapters with scales, guidance)
    ((("painterly", 1.0),), 0.0),
    ((("painterly", 1.3), ("sketch", -0.6)), 0.0),
    ((("sketch", 0.5), ("attn_only", 2.0)), 3.0),
]


@pytest.mark.parametrize("chosen, guidance", CASES, ids=lambda c: "+".join(f"{n}@{s}" for n, s in c)
                         if isinstance(c, tuple) else f"cfg{c}")
def test_adapters_match_diffusers(pipeline, tiny_source, lora_dir, adapters, chosen, guidance):
    names, scales = zip(*chosen)
    spec = GenerationSpec("a red fox in fresh snow", 256, 256, steps=2, seed=11, guidance_scale=guidance,
                          negative_prompt="blurry" if guidance else "")
    plain = pixels(pipeline.generate([spec])[0])
    ours = pixels(pipeline.generate([GenerationSpec(**{**spec.__dict__, "loras": tuple(
        (adapters[n], s) for n, s in chosen)})])[0])
    assert np.abs(ours - plain).max() > 20  # the adapters really change the image
    assert np.abs(ours - reference(tiny_source, lora_dir, names, scales, spec)).max() <= MAX_PIXEL_DIFF


def test_a_job_in_a_batch_with_other_adapters_equals_it_alone(pipeline, adapters):
    """batch_invariant off: the jobs share each forward, one batch row each, with their own adapters."""
    source = pipeline.loop
    loop = DenoiseLoop(source.transformer, source.schedules._scheduler, CPU, F32, batch_invariant=False)
    specs = [
        GenerationSpec("a koi pond", 256, 256, steps=2, seed=1, loras=((adapters["painterly"], 0.9),)),
        GenerationSpec("a lighthouse", 256, 256, steps=2, seed=2),
        GenerationSpec("a teapot", 256, 256, steps=2, seed=3,
                       loras=((adapters["sketch"], -1.2), (adapters["attn_only"], 0.4))),
    ]
    pipeline_loop, pipeline.loop = pipeline.loop, loop
    try:
        together = [pixels(image) for image in pipeline.generate(specs)]
        alone = [pixels(pipeline.generate([spec])[0]) for spec in specs]
    finally:
        pipeline.loop = pipeline_loop
    for one, other in zip(together, alone):
        assert np.abs(one - other).max() <= MAX_PIXEL_DIFF
    assert np.abs(together[0] - together[1]).max() > 20


def test_fused_projections_give_the_unfused_update(tiny_source, adapters, lora_dir):
    """q/k/v and w1/w3 factors laid out for fused `to_qkv` / `w13` compute the unfused model's output."""
    plain = loading.load_transformer(tiny_source, CPU, F32)
    install_real_rope(plain, "math")
    fused = fuse_projections(copy.deepcopy(plain))
    outputs = []
    library = LoraLibrary(LoraSettings(lora_dir=str(lora_dir)))
    torch.manual_seed(0)
    x = [torch.randn(16, 1, 64, 64) for _ in range(2)]
    caps = [torch.randn(7, 64), torch.randn(12, 64)]
    t = torch.tensor([0.3, 0.8])
    for transformer in (plain, fused):
        slots = install_lora(transformer)
        rows = [((slots.lay_out(library.load("sketch")[0]), 0.8),), ()]
        assert any(path.endswith("to_qkv") for path in slots.slots) == (transformer is fused)
        with torch.inference_mode(), slots.using(rows):
            outputs.append(transformer(x, t, caps, return_dict=False)[0])
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
