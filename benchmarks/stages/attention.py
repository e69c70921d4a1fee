"""SDPA alone at the 1024x1024 sequence length, per backend: what attention costs before the model."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.harness import Bench
from benchmarks.stages.dit import pad_seq
from deployments.geometry import image_tokens


def section_attention(bench: Bench, cfg: Any) -> None:
    """SDPA alone at the 1024x1024 unified length: how much each backend leaves on the table."""
    if not bench.cuda:
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seq = pad_seq(image_tokens(1024, 1024)) + pad_seq(bench.args.caption_tokens)
    heads, head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
    g = torch.Generator(bench.device).manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, seq, head_dim, generator=g, device=bench.device, dtype=bench.dtype) for _ in range(3)
    )
    flops = 4.0 * seq * seq * head_dim * heads
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]), torch.inference_mode():
                timing = bench.measure(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), repeats=10)
        except RuntimeError as exc:
            bench.note(f"SDPA {backend.name}: unavailable ({str(exc).splitlines()[0][:120]})")
            continue
        timing["tflops"] = flops / (timing["median_ms"] / 1000) / 1e12
        out[backend.name] = timing
        bench.row("attention", 1024, backend.name.lower(), timing, tflops=round(timing["tflops"], 1))
    bench.results["attention_per_layer"] = {"seq": seq, "flops": flops, "backends": out}
    del q, k, v
    bench.free()
