"""Adapters are inputs of the compiled blocks, never constants: once the serving warm-up has run its
LoRA calls, new adapters, ranks, scales, target sets and row mixes compile nothing, and the compiled
blocks compute what the eager ones do."""

from __future__ import annotations

import pytest
import torch

from deployments.denoiser.dit import warmup
from deployments.denoiser.lora.adapter import LoraAdapter
from deployments.denoiser.lora.random_adapters import random_factors
from tests.unit.test_dit_speedups import compiled_blocks, forward, make_inputs, rel_err


@pytest.fixture()
def compiled(tiny_source):
    """Both with real RoPE, fused projections and LoRA wrappers; only the second compiled."""
    with compiled_blocks(tiny_source, optimize_reference=True) as (eager, ours, graphs):
        yield eager, ours, graphs


def test_new_adapters_compile_nothing_after_the_warm_up(compiled):
    eager, ours, graphs = compiled
    single, batched = warmup.serving_calls([(512, 512)], max_batch_size=3, max_caption_tokens=64, lora=True)
    assert [c.key for c in single + batched if c.lora_rank] == [
        "512x512/b1/lora", "512x512/b1/cap32/lora", "512x512/b2/lora", "512x512/b2/ragged/lora", "512x512/b3/lora",
        "512x512/b3/ragged/lora"]
    warmup.run_calls(ours, single + batched, save=False)
    warmed = len(graphs)
    assert warmed > 0  # the warm-up compiled the blocks: what follows must add no graph to these
    # a forward without adapters runs graphs with no trace of them (no update op, nothing to guard on)
    with_update = [graph for graph in graphs if "lora_add_" in graph.code]
    assert 0 < len(with_update) < warmed

    def adapter(model, rank, seed, targets=None):
        slots = model._lora_slots
        kwargs = {"targets": targets} if targets else {}
        return slots.lay_out(LoraAdapter(f"a{seed}", random_factors(model, rank, seed, **kwargs)))

    mixes = [  # (per image: [(rank, seed, targets, scale)], image shapes (h, w, caption))
        ([[(4, 1, None, 1.0)]], [(64, 64, 17)]),
        ([[(8, 2, ("attention.to_q", "attention.to_v"), 0.5)], []], [(64, 64, 17), (48, 80, 40)]),
        ([[], [(16, 3, None, -1.0), (1, 4, ("feed_forward.w2",), 2.0)], []], [(64, 64, 9)] * 3),
        ([[(32, 5, None, 0.3)], [(4, 6, None, 1.5)], [(12, 7, ("attention.to_out.0",), 1.0)]],
         [(32, 32, 70), (64, 64, 20), (48, 48, 33)]),
    ]
    for index, (rows, shapes) in enumerate(mixes):
        inputs = make_inputs(ours.config, shapes, seed=20 + index)
        outputs = []
        for model in (eager, ours):
            adapters = [tuple((adapter(model, r, s, t), scale) for r, s, t, scale in row) for row in rows]
            with torch.inference_mode(), model._lora_slots.using(adapters):
                outputs.append(forward(model, inputs))
        for got, expected in zip(outputs[1], outputs[0]):
            assert rel_err(got, expected) <= 1e-5
        with torch.inference_mode():
            plain = forward(eager, inputs)
        assert rel_err(outputs[0][0], plain[0]) > 1e-3 or not rows[0]  # the adapters did change the output
    assert len(graphs) == warmed
