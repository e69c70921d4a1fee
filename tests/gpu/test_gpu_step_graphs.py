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
