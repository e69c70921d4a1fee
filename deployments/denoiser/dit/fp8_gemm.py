"""The row-wise FP8 GEMM of the fused blocks' linears, on activations that arrive already quantized.

One function for the plain linear (`fp8_linear.Fp8Weight`) and for the linear with LoRA rows after its
weight (`lora.ops.fp8_lora_linear`), so both run the same GEMM.
"""

from __future__ import annotations

import torch


def fp8_gemm(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`[rows, in]` FP8 rows with `[rows, 1]` float32 scales times the FP8 weight `[out, in]` with `[1, out]`
    scales -> `[rows, out]` bf16: cuBLAS's FP8 GEMM with a scale per activation row and per output
    channel (what torchao's rowwise config runs) on a GPU; the dequantized product on a CPU (tests)."""
    if x.device.type != "cuda":
        return ((x.float() * x_scale) @ (weight.float() * scale.t()).t()).to(torch.bfloat16)
    return torch._scaled_mm(x, weight.t(), scale_a=x_scale, scale_b=scale, out_dtype=torch.bfloat16,
                            use_fast_accum=True)
