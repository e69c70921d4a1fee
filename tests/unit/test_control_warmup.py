"""The Denoiser's warm-up with a ControlNet (deployments.denoiser.control_warmup), on the tiny
checkpoint with the tiny Union 2.x-shaped ControlNet (33 control channels), float32 on the CPU: which
controlled calls each phase gets, that they run the ControlNet in both layouts, and that images after
the warm-up are the images before it, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.denoiser import control_forward
from deployments.denoiser.control import DEFAULT_CONTROL_SCALE
from deployments.denoiser.control_warmup import controlled, serving_control_calls
from deployments.denoiser.dit.warmup import WarmupCall, run_calls, serving_calls
from deployments.local_pipeline import GenerationSpec, LocalPipeline
from deployments.weights.controlnet_source import resolve_controlnet
from tests.unit.test_controlnet import edges
from tests.unit.test_inpaint import blob_mask
from tests.unit.test_parity import make_photo, pixels

SIZES = [(512, 512), (640, 512)]


@pytest.mark.parametrize("in_background", [True, False], ids=["batches-after-ready", "all-before-ready"])
@pytest.mark.parametrize("takes_mask", [True, False], ids=["union-2", "16-channels"])
def test_controlled_calls_follow_the_plain_phases(in_background, takes_mask):
    single, batched = serving_calls(SIZES, 4, 100, lora=True)
    if not in_background:
        single, batched = single + batched, []
    presets = [(640, 512), (1024, 1024), (768, 1344)]  # one of them warmed before ready
    before, with_batches, with_shapes = serving_control_calls(single, batched, takes_mask, presets)
    forms = ["control", "control-mask"] if takes_mask else ["control"]
    plain_b1 = [f"{w}x{h}/b1" for w, h in SIZES]
    over_one = [c.key for c in (*single, *batched) if c.batch > 1 and not c.lora_rank]
    buckets = [c.key for c in single if "/cap" in c.key and not c.lora_rank]
    assert over_one and buckets
    early = [] if in_background else over_one
    assert [c.key for c in before] == [f"{k}/{f}" for k in plain_b1 for f in forms] + [f"{k}/control" for k in early]
    assert [c.key for c in with_batches] == ([f"{k}/control" for k in over_one] if in_background else [])
    assert [c.key for c in with_shapes] == [f"{k}/control" for k in buckets] + [
        "768x1344/b1/control", "1024x1024/b1/control"]  # presets not warmed, fewest tokens first
    assert {c.caption_lens for c in with_shapes[-2:]} == {(160,)}  # the warm-up's caption length
    for call in (*before, *with_batches, *with_shapes):
        assert call.control in ("control", "mask") and not call.lora_rank
        assert call.control == "mask" or call.key.endswith("/control")


@pytest.fixture(scope="module")
def local(tiny_source, cache_dir) -> LocalPipeline:
    """A pipeline of its own, so that its first controlled images come from a model nothing warmed."""
    return LocalPipeline(tiny_source, torch.device("cpu"), torch.float32,
                         controlnet=resolve_controlnet("tiny", cache_dir))


def test_warmup_runs_the_controlnet_and_changes_no_image(local, monkeypatch):
    control = edges(256, 256, 7)
    specs = [  # a controlled generation, a controlled inpainting edit (the Union 2.x mask layout)
        GenerationSpec("a lighthouse", 256, 256, steps=2, seed=7, control_image=control, control_scale=0.6),
        GenerationSpec("a lighthouse", 256, 256, steps=2, seed=8, init_image=make_photo(256, 256, 8),
                       mask=blob_mask(256, 256, 8), control_image=control),
    ]
    cold = [pixels(local.generate([spec])[0]) for spec in specs]

    runner, transformer = local.control, local.loop.transformer
    assert runner.takes_mask
    seen = []  # (rows, control channels past the latents, any nonzero there, scales) per ControlNet call
    hints = control_forward.hints

    def record(controlnet, dit, made, contexts, scales, rows=None):
        seen.append((len(contexts), [bool(c[16:].any()) for c in contexts], scales.flatten().tolist()))
        return hints(controlnet, dit, made, contexts, scales, rows)

    single, batched = serving_calls([(256, 256)], 2, 40)
    before, with_batches, with_shapes = serving_control_calls(single, batched, runner.takes_mask)
    calls = before + with_batches + with_shapes
    monkeypatch.setattr(control_forward, "hints", record)
    timings = run_calls(transformer, calls, save=False, control=runner)
    monkeypatch.undo()
    assert list(timings) == [c.key for c in calls] and len(calls) == 2 + 2 + 2
    assert len(seen) == len(calls)
    for call, (rows, mask_channels, scales) in zip(calls, seen):
        assert rows == 1  # one controlled image, the others of a batch uncontrolled
        assert mask_channels == [call.control == "mask"]  # zeros past the latents unless in the mask layout
        assert scales == [DEFAULT_CONTROL_SCALE]

    warm = [pixels(local.generate([spec])[0]) for spec in specs]
    for before_image, after_image in zip(cold, warm):
        assert np.array_equal(before_image, after_image)
    plain = pixels(local.generate([GenerationSpec("a lighthouse", 256, 256, steps=2, seed=7)])[0])
    assert np.abs(plain - warm[0]).max() > 10  # the control enters the compared image


def test_controlled_calls_need_a_controlnet(local):
    call = WarmupCall("512x512/b1/control", 512, 512, (40,), control="control")
    with pytest.raises(ValueError, match="no ControlNet"):
        run_calls(local.loop.transformer, [call], save=False)
    contexts = local.control.warmup_controls(WarmupCall("b3", 512, 640, (9, 9, 9), control="mask"))
    assert contexts[0].context.shape == (33, 1, 80, 64) and contexts[1:] == [None, None]
    assert [c.key for c in controlled([call], takes_mask=False)] == ["512x512/b1/control/control"]


def test_the_denoiser_runs_the_control_warmup_in_its_phases(monkeypatch, cache_dir, tiny_source):
    """The Denoiser's own start (on the CPU, where compile and so the warm-up are off, with the
    warm-up's calls given as on a GPU): the controlled calls run before ready and with the batches
    after it, reported in its stats as the plain ones; a controlled job then gives the latents of a
    pipeline that never warmed."""
    from deployments.contracts import ControlLatents, DenoiseJob
    from deployments.denoiser.deployment import Denoiser

    def calls(self):
        return serving_calls(self.settings.warmup_pixels(), 2, 40)

    monkeypatch.setattr(Denoiser.func_or_class, "_serving_calls", calls)
    settings = {"model": "tiny", "device": "cpu", "cache_dir": str(cache_dir), "controlnet": "tiny",
                "warmup_sizes": ["256x256"]}
    denoiser = Denoiser.func_or_class(settings)
    assert denoiser.after_ready.wait(120)
    stats = denoiser.stats()
    assert {"256x256/b1", "256x256/b1/control", "256x256/b1/control-mask"} <= set(stats["warmup_seconds"])
    assert not any("/cap" in key and "/control" in key for key in stats["warmup_seconds"])  # those: after ready
    after = stats["batched_warmup"]["timings"]
    assert {"256x256/b2", "256x256/b2/control", "256x256/b2/ragged/control"} <= set(after)
    assert stats["start_phases"]["warmup_s"] > 0 and stats["start_phases"]["warmup_after_ready_s"] > 0
    assert stats["shape_warmup"]["calls"] == 0  # shapes: GPU only, the caption buckets' controlled calls too

    fresh_pipeline = LocalPipeline(tiny_source, torch.device("cpu"), torch.float32,
                                   controlnet=resolve_controlnet("tiny", cache_dir))  # never warmed
    latents = ControlLatents(control=torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(4)))
    job = DenoiseJob(caption=torch.randn(12, 64, generator=torch.Generator().manual_seed(3)), width=256,
                     height=256, steps=2, seed=3, control=fresh_pipeline.control.context(latents, 0.75))
    (warmed,) = denoiser.loop.run([job])
    (fresh,) = fresh_pipeline.loop.run([job])
    assert torch.equal(warmed.latents, fresh.latents)
