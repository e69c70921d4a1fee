"""Captions padded to their bucket (deployments.denoiser.dit.caption_buckets) compute what the exact
length computes, on the tiny checkpoint in float32 on the CPU: bitwise, for the stock DiT and for
the DiT as the Denoiser optimizes it; and step graphs keyed by bucket replay any length of a bucket.
The GPU side (a captured graph in bf16 / FP8 against the exact-length forward) is
tests/gpu/test_gpu_step_graphs.py.
"""

from __future__ import annotations

import pytest
import torch

from deployments.contracts import DenoiseJob
from deployments.denoiser.dit import caption_buckets
from deployments.denoiser.dit.caption_buckets import (
    bucketed,
    caption_bucket,
    pad_caption,
    padded_transformer_fn,
)
from deployments.denoiser.dit.optimize import optimize_transformer
from deployments.denoiser.dit.step_graphs import GraphedTransformerFn
from deployments.denoiser.loop import DenoiseLoop, diffusers_transformer_fn
from deployments.weights import loading
from tests.unit.test_step_graphs import stand_in_capture

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tiny_source):
    """The tiny DiT stock and as the Denoiser optimizes it, loaded once (calls leave them unchanged)."""
    return {"stock": load(tiny_source, False), "optimized": load(tiny_source, True)}


def load(source, optimized: bool):
    transformer = loading.load_transformer(source, CPU, torch.float32)
    g = torch.Generator("cpu").manual_seed(3)
    with torch.no_grad():  # a checkpoint's pad tokens are learned: not the zeros a fresh model starts with
        transformer.cap_pad_token.copy_(torch.randn(transformer.cap_pad_token.shape, generator=g))
        transformer.x_pad_token.copy_(torch.randn(transformer.x_pad_token.shape, generator=g))
    if optimized:  # as the Denoiser runs it on a GPU, less FP8 and compile: real RoPE, fused projections
        optimize_transformer(transformer, "bf16", compile=False)
    return transformer


def inputs(cfg, items, seed=0):
    """items: (latent height, latent width, caption length) per image."""
    g = torch.Generator("cpu").manual_seed(seed)
    latents = [torch.randn(cfg.in_channels, 1, h, w, generator=g) for h, w, _ in items]
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=g) for *_, n in items]
    return latents, torch.rand(len(items), generator=g), captions


def test_buckets_and_masks_are_what_diffusers_builds():
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    assert caption_buckets.SEQ_MULTI_OF == SEQ_MULTI_OF
    assert [caption_bucket(n) for n in (1, 31, 32, 33, 512)] == [32, 32, 32, 64, 512]
    caption = torch.arange(10.0).reshape(5, 2)
    padded, mask = pad_caption(caption)
    assert padded.shape == (32, 2) and torch.equal(padded[:5], caption)
    assert torch.equal(padded[5:], caption[-1:].expand(27, 2))  # the last row repeated, as `_pad_with_ids`
    assert mask.tolist() == [False] * 5 + [True] * 27
    with pytest.raises(ValueError):
        caption_bucket(0)


@pytest.mark.parametrize("variant", ["stock", "optimized"])
@pytest.mark.parametrize("items", [[(8, 8, 1)], [(8, 12, 31)], [(8, 8, 32)], [(8, 8, 20), (12, 8, 70)]], ids=str)
def test_a_padded_caption_computes_what_the_exact_length_computes(models, variant, items):
    transformer = models[variant]
    exact = diffusers_transformer_fn(transformer)
    padded = bucketed(padded_transformer_fn(transformer))
    with torch.inference_mode():
        want = exact(*inputs(transformer.config, items))
        got = padded(*inputs(transformer.config, items))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_padding_without_the_pad_mask_would_differ(models):
    """What the mask does: the same padded rows given as a caption of 32 real tokens change the output."""
    transformer = models["stock"]
    latents, t, captions = inputs(transformer.config, [(8, 8, 20)])
    with torch.inference_mode():
        want = transformer(latents, t, captions, return_dict=False)[0][0]
        naive = transformer(latents, t, [pad_caption(captions[0])[0]], return_dict=False)[0][0]
        caption, mask = pad_caption(captions[0])
        assert torch.equal(padded_transformer_fn(transformer)(latents, t, [caption], [mask])[0], want)
        after = transformer(latents, t, [pad_caption(captions[0])[0]], return_dict=False)[0][0]
    assert not torch.allclose(naive, want, atol=1e-4)
    assert torch.equal(after, naive)  # the pad masks apply to the padded call only


def test_a_bucket_graph_replays_every_length_of_its_bucket(models):
    """One graph per (size, bucket), on the model: lengths 20, 5 and 31 share the 32 bucket's graph,
    33 and 64 the 64 one's; every output equals the exact-length forward bitwise."""
    transformer = models["optimized"]
    exact = diffusers_transformer_fn(transformer)
    log = []
    graphed = GraphedTransformerFn(exact, stand_in_capture(log), padded=padded_transformer_fn(transformer))
    lengths = [20, 5, 33, 31, 64]
    with torch.inference_mode():
        for seed, n in enumerate(lengths):
            got = graphed(*inputs(transformer.config, [(8, 8, n)], seed))
            assert torch.equal(got[0], exact(*inputs(transformer.config, [(8, 8, n)], seed))[0]), n
    assert graphed.graph_count() == 2 and log == ["capture", "capture"]
    assert graphed.stats["plain"] == 2 and graphed.stats["replays"] == len(lengths) - 2
    assert graphed.as_dict()["bucketed"] is True


def test_prepare_captures_without_a_request_and_a_request_then_replays(models):
    transformer = models["optimized"]
    exact = diffusers_transformer_fn(transformer)
    graphed = GraphedTransformerFn(exact, stand_in_capture([]), padded=padded_transformer_fn(transformer))
    with torch.inference_mode():
        assert graphed.prepare(*inputs(transformer.config, [(8, 8, 31)]))  # plain forward, then capture
        assert graphed.prepare(*inputs(transformer.config, [(8, 8, 2)]))  # the same bucket: held already
        assert graphed.stats == {"plain": 1, "captures": 1, "replays": 0, "evicted": 0, "capture_failures": 0}
        got = graphed(*inputs(transformer.config, [(8, 8, 7)], seed=5))
        assert torch.equal(got[0], exact(*inputs(transformer.config, [(8, 8, 7)], seed=5))[0])
        assert not graphed.prepare(*inputs(transformer.config, [(8, 8, 7), (8, 8, 9)]))  # over max_batch
    assert graphed.stats["replays"] == 1 and graphed.stats["plain"] == 1


def test_a_denoise_loop_on_bucket_graphs_gives_the_plain_loops_latents(models, tiny_source):
    """The steps of jobs whose captions share a bucket, through bucket graphs, against the plain loop."""
    transformer = models["optimized"]
    scheduler = loading.load_scheduler(tiny_source)
    graphed = GraphedTransformerFn(diffusers_transformer_fn(transformer), stand_in_capture([]),
                                   padded=padded_transformer_fn(transformer))
    plain_loop = DenoiseLoop(transformer, scheduler, CPU, torch.float32)
    graph_loop = DenoiseLoop(transformer, scheduler, CPU, torch.float32, transformer_fn=graphed)
    g = torch.Generator("cpu").manual_seed(0)
    for seed, n in enumerate((9, 23)):
        job = DenoiseJob(caption=torch.randn(n, transformer.config.cap_feat_dim, generator=g), width=64,
                         height=64, steps=4, seed=seed)
        assert torch.equal(graph_loop.run([job])[0].latents, plain_loop.run([job])[0].latents)
    assert graphed.graph_count() == 1 and graphed.stats["replays"] == 4 + 3
