"""What the Denoiser warms after ready (deployments.denoiser.dit.size_warmup): which shapes, and that
the steps run: graphs of every caption bucket, then first forwards at sizes not warmed yet."""

from __future__ import annotations

import pytest
import torch

from deployments.denoiser.dit.caption_buckets import padded_transformer_fn
from deployments.denoiser.dit.size_warmup import (
    after_ready_steps,
    caption_buckets_up_to,
    image_sequence,
    size_calls,
)
from deployments.denoiser.dit.step_graphs import GraphedTransformerFn
from deployments.denoiser.loop import diffusers_transformer_fn
from deployments.geometry import SIZE_PRESETS, image_tokens
from deployments.weights import loading
from tests.unit.test_step_graphs import stand_in_capture

BUCKETS = caption_buckets_up_to(512)
WARM = [(512, 512), (1024, 1024)]


def sequences(sizes, buckets) -> set[int]:
    """The attention lengths batch-1 forwards at these sizes and buckets run: image, image + caption."""
    return {s for w, h in sizes for b in buckets for s in (image_sequence(w, h), image_sequence(w, h) + b)}


def test_buckets_cover_every_caption_the_cap_admits():
    from deployments.denoiser.dit.warmup import serving_calls

    assert BUCKETS == list(range(32, 513, 32))
    assert caption_buckets_up_to(500)[-1] == 512 and caption_buckets_up_to(16) == [32]
    single, _ = serving_calls([(512, 512)], 1, 500)  # the start-up warm-up: a 500-token caption runs at 512
    assert "512x512/b1/cap512" in {c.key for c in single}


@pytest.mark.parametrize("warm", [WARM, []], ids=["warm 512 and 1024", "nothing warm"])
def test_every_preset_gets_a_forward_and_small_presets_every_sequence_length(warm):
    calls = size_calls(SIZE_PRESETS, BUCKETS, warm)
    sizes = [(c.width, c.height) for c in calls]
    assert set(sizes) == set(SIZE_PRESETS) - set(warm)  # each preset once at least, none already warm
    assert all(c.batch == 1 for c in calls) and len(set(c.key for c in calls)) == len(calls)
    tokens = [image_tokens(*s) for s in sizes]
    assert tokens == sorted(tokens)  # cheapest first
    run = sequences(warm, BUCKETS) | {s for c in calls for s in (image_sequence(c.width, c.height),
                                                                  image_sequence(c.width, c.height) + c.caption_lens[0])}
    small = [s for s in SIZE_PRESETS if image_tokens(*s) <= 4096]
    assert sequences(small, BUCKETS) <= run  # a first request there, any caption, plans nothing
    assert {image_sequence(*s) for s in SIZE_PRESETS} <= run
    assert len(calls) < len(SIZE_PRESETS) + 2 * len(BUCKETS)  # shared lengths are run once


def test_the_steps_capture_a_graph_per_bucket_then_run_the_sizes(tiny_source):
    transformer = loading.load_transformer(tiny_source, torch.device("cpu"), torch.float32)
    graphs = GraphedTransformerFn(diffusers_transformer_fn(transformer), stand_in_capture([]),
                                  padded=padded_transformer_fn(transformer))
    steps = after_ready_steps(transformer, graphs, [(128, 128)], [(128, 128), (256, 128), (128, 256)],
                              [], max_caption_tokens=64)
    keys = [key for key, _ in steps]
    assert keys[:2] == ["128x128/graph/cap32", "128x128/graph/cap64"]
    assert {k.split("/")[0] for k in keys[2:]} == {"256x128", "128x256"}  # 128x128 ran with the graphs
    for _, step in steps:
        step()
    assert graphs.graph_count() == 2 and graphs.stats["captures"] == 2 and graphs.stats["replays"] == 0
    with torch.inference_mode():  # a request of an unseen length replays from its first step
        graphs([torch.randn(16, 1, 16, 16)], torch.full((1,), 0.5), [torch.randn(45, 64)])
    assert graphs.stats["replays"] == 1 and graphs.stats["plain"] == 2


def test_with_a_controlnet_the_steps_capture_controlled_graphs_too(tiny_source, tiny_controlnet):
    """With a ControlNet the graphs of every bucket are captured controlled too; the ControlNet's
    caption-bucket calls at the graphed size (their first forwards) do not run again, its preset
    calls do; a controlled request of an unseen length then replays from its first step."""
    from deployments.denoiser.control import ControlContext, ControlNetRunner, control_context
    from deployments.denoiser.control_warmup import serving_control_calls
    from deployments.denoiser.dit.warmup import serving_calls
    from deployments.weights.controlnet_source import load_controlnet
    from tests.unit.test_step_graphs import control_state_capture

    transformer = loading.load_transformer(tiny_source, torch.device("cpu"), torch.float32)
    runner = ControlNetRunner(load_controlnet(tiny_controlnet, torch.device("cpu"), torch.float32), transformer)
    graphs = GraphedTransformerFn(diffusers_transformer_fn(transformer), control_state_capture(runner, []),
                                  padded=padded_transformer_fn(transformer), control=runner)
    single, batched = serving_calls([(128, 128)], 2, 64)
    shapes = serving_control_calls(single, batched, runner.takes_mask, [(128, 128), (256, 128)])[2]
    assert [c.key for c in shapes] == ["128x128/b1/cap32/control", "128x128/b1/cap64/control", "256x128/b1/control"]
    steps = after_ready_steps(transformer, graphs, [(128, 128)], [(128, 128)], [], max_caption_tokens=64,
                              control=runner, control_calls=shapes)
    keys = [key for key, _ in steps]
    assert keys == ["128x128/graph/cap32", "128x128/graph/cap64", "128x128/graph/cap32/control",
                    "128x128/graph/cap64/control", "256x128/b1/control"]
    for _, step in steps:
        step()
    stats = graphs.as_dict()
    assert stats["graphs"] == 4 and stats["control_graphs"] == 2 and stats["replays"] == 0
    control = ControlContext(control_context(torch.randn(1, 16, 16, 16), 33), 0.4)
    with torch.inference_mode(), runner.using([control]):
        graphs([torch.randn(16, 1, 16, 16)], torch.full((1,), 0.5), [torch.randn(45, 64)])
    assert graphs.stats["replays"] == 1
