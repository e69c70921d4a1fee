"""CUDA-graph replays of the DiT forward (deployments.denoiser.dit.step_graphs) against plain forwards.

With `ZIMAGE_GPU_REPORT=path.json` the measured differences are written there, with the fused
path's GPU figures (its `record`).
"""

from __future__ import annotations

import pytest
import torch

from deployments.denoiser.loop import diffusers_transformer_fn
from deployments.denoiser.dit import fp8_attention
from deployments.denoiser.dit.step_graphs import GraphedTransformerFn
from tests.gpu.test_gpu_fused_fp8 import dit_inputs, record, small_full_width_dit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("kernels", ["fused", "inductor"])
def test_replays_compute_what_plain_forwards_compute(kernels):
    """A compiled FP8 DiT: a shape's first call runs plain, its second captures, later ones replay;
    each on new input values against the plain forward of the same values. Two shapes interleaved,
    so a replay follows another graph's replay in the shared memory pool."""
    if kernels == "fused" and not fp8_attention.cudnn_fp8_attention_available(torch.device("cuda")):
        pytest.skip("needs cuDNN's frontend on sm_90")
    from deployments.denoiser.dit.optimize import optimize_transformer

    transformer = small_full_width_dit()
    optimize_transformer(transformer, "fp8", compile=True, attention="cudnn", fp8_kernels=kernels)
    plain = diffusers_transformer_fn(transformer)
    graphed = GraphedTransformerFn.on(plain, torch.device("cuda"))
    worst = 0.0
    with torch.inference_mode():
        for seed in range(4):
            for items in ([(64, 64, 160)], [(48, 80, 33)]):
                inputs = dit_inputs(items, seed=seed)
                got = graphed(*inputs)[0].float()
                want = plain(*inputs)[0].float()
                worst = max(worst, ((got - want).norm() / want.norm()).item())
    record(**{f"step_graphs_{kernels}": {"max_rel_diff_vs_plain": worst, **graphed.as_dict()}})
    assert graphed.stats["captures"] == 2 and graphed.stats["replays"] == 6 and graphed.stats["capture_failures"] == 0
    assert worst <= 1e-6  # the same kernels on the same inputs


LENGTHS = (1, 17, 31, 32, 33, 100, 160, 250, 511)  # several per bucket, and the bucket edges


def bucket_graphs_against_exact(transformer, sizes, lengths=LENGTHS) -> tuple[float, dict]:
    """Every bucket's graph prepared first (as the warm-up does), then each length's replay against the
    plain forward of the exact-length caption on the same inputs; the worst relative difference."""
    from deployments.denoiser.dit.caption_buckets import caption_bucket, padded_transformer_fn

    plain = diffusers_transformer_fn(transformer)
    graphed = GraphedTransformerFn.on(plain, torch.device("cuda"), padded=padded_transformer_fn(transformer))
    worst = 0.0
    with torch.inference_mode():
        for h, w in sizes:
            for n in sorted({caption_bucket(n) for n in lengths}):
                assert graphed.prepare(*dit_inputs([(h, w, n)], seed=99))
            for seed, n in enumerate(lengths):
                inputs = dit_inputs([(h, w, n)], seed=seed)
                got = graphed(*inputs)[0].float()
                want = plain(*inputs)[0].float()
                worst = max(worst, ((got - want).norm() / want.norm()).item())
    return worst, graphed.as_dict()


@pytest.mark.parametrize("precision,kernels", [("bf16", None), ("fp8", "fused"), ("fp8", "inductor")])
def test_a_bucket_graph_replays_what_the_exact_length_computes(precision, kernels):
    """Graphs keyed by caption bucket (captions padded with diffusers' own pad rows and mask): each
    length's replay against the exact-length plain forward, on the full-width DiT compiled. The
    maths is the same function (bitwise on the CPU, tests/unit/test_caption_buckets.py); the
    measured difference is printed and recorded, the bound set near it."""
    if kernels == "fused" and not fp8_attention.cudnn_fp8_attention_available(torch.device("cuda")):
        pytest.skip("needs cuDNN's frontend on sm_90")
    from deployments.denoiser.dit.optimize import optimize_transformer

    transformer = small_full_width_dit()
    optimize_transformer(transformer, precision, compile=True, attention="cudnn", fp8_kernels=kernels or "inductor")
    worst, stats = bucket_graphs_against_exact(transformer, [(64, 64), (48, 80)])
    print(f"bucket graphs {precision}/{kernels}: max rel diff vs exact length {worst:.3g}; {stats}")
    record(**{f"bucket_graphs_{precision}_{kernels}": {"max_rel_diff_vs_exact": worst, **stats}})
    buckets = len({-(-n // 32) for n in LENGTHS})
    assert stats["captures"] == 2 * buckets and stats["replays"] == 2 * len(LENGTHS)
    assert stats["plain"] == 2 * buckets and stats["capture_failures"] == 0 and stats["graph_pool_mib"] > 0
    assert worst <= 1e-6  # the same kernels on the same values


def test_bucket_graphs_on_the_full_size_random_model():
    """The same on the full-size random model as the Denoiser runs it by default on an H200 (FP8,
    fused kernels where cuDNN's frontend is installed, compiled), at 512x512 and 1024x1024."""
    from deployments.denoiser.dit.optimize import optimize_transformer
    from deployments.weights.loading import load_transformer
    from deployments.weights.model_source import resolve_model_source

    device = torch.device("cuda")
    kernels = "fused" if fp8_attention.cudnn_fp8_attention_available(device) else "inductor"
    transformer = load_transformer(resolve_model_source("random"), device, torch.bfloat16)
    optimize_transformer(transformer, "fp8", compile=True, attention="cudnn", fp8_kernels=kernels)
    worst, stats = bucket_graphs_against_exact(transformer, [(64, 64), (128, 128)], lengths=(9, 31, 40, 150, 500))
    print(f"bucket graphs, full-size random model, fp8/{kernels}: max rel diff vs exact length {worst:.3g}; {stats}")
    record(**{f"bucket_graphs_full_fp8_{kernels}": {"max_rel_diff_vs_exact": worst, **stats}})
    assert stats["capture_failures"] == 0 and stats["replays"] == 2 * 5
    assert worst <= 1e-6
