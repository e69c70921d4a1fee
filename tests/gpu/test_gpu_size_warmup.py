"""The Denoiser's warm-up after ready (deployments.denoiser.dit.size_warmup) on a GPU: after it, a
first forward at a preset with any caption length builds no attention plan of its own.

On the fused FP8 path the attention plans are cuDNN graphs we build and cache ourselves
(`fp8_attention._SDPA`), so "no plan made" is a count. The full-width DiT with 2 layers, compiled;
first and second forwards at each checked shape are timed and printed.

    pytest -q -m gpu tests/gpu/test_gpu_size_warmup.py -s
"""

from __future__ import annotations

import time

import pytest
import torch

from deployments.denoiser.dit import fp8_attention
from deployments.denoiser.dit.size_warmup import after_ready_steps
from deployments.geometry import SIZE_PRESETS, image_tokens
from tests.gpu.test_gpu_fused_fp8 import dit_inputs, record, small_full_width_dit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def timed_forward(transformer, items, seed) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    transformer(*dit_inputs(items, seed=seed), return_dict=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def test_after_the_size_warm_up_a_first_preset_request_builds_no_attention_plan():
    device = torch.device("cuda")
    if not fp8_attention.cudnn_fp8_attention_available(device):
        pytest.skip("needs cuDNN's frontend on sm_90")
    from deployments.denoiser.dit.optimize import optimize_transformer
    from deployments.denoiser.dit.warmup import run_calls, serving_calls

    transformer = small_full_width_dit()
    optimize_transformer(transformer, "fp8", compile=True, attention="cudnn", fp8_kernels="fused")
    warm = [(512, 512), (1024, 1024)]
    with torch.inference_mode():
        run_calls(transformer, serving_calls(warm, 1, 512)[0], save=False)  # the start-up warm-up
        steps = after_ready_steps(transformer, None, warm, SIZE_PRESETS, warm, 512)
        for _, step in steps:
            step()
        plans = len(fp8_attention._SDPA._graphs)
        rows = []
        for width, height in SIZE_PRESETS:
            lengths = (7, 100, 300, 512) if image_tokens(width, height) <= 4096 else (150,)
            for n in lengths:
                items = [(height // 8, width // 8, n)]
                first, second = timed_forward(transformer, items, 1), timed_forward(transformer, items, 2)
                rows.append({"size": f"{width}x{height}", "caption": n, "first_ms": round(first * 1000, 2),
                             "second_ms": round(second * 1000, 2)})
    worst = max(rows, key=lambda r: r["first_ms"] / r["second_ms"])
    print(f"{len(steps)} warm-up calls; worst first/second forward: {worst}")
    record(size_warmup={"calls": len(steps), "worst_first_vs_second": worst, "rows": rows})
    assert len(fp8_attention._SDPA._graphs) == plans, "a first forward at a preset built an attention plan"
