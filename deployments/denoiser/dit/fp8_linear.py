"""FP8 GEMMs on activations that arrive already quantized.

torchao's FP8 linear quantizes its own input, so whatever comes before it (norm, modulation, SwiGLU)
is a separate pass over the row. The fused path (`fused_block`) quantizes in the kernel that makes
the row (`fused_quant`) and hands the FP8 row and its scale here: `torch._scaled_mm` with a scale
per row of the activation and per output channel of the weight, what torchao's rowwise config runs.
"""

from __future__ import annotations

import torch
from torch import nn

from deployments.denoiser.dit.fused_quant import quantize_rows_reference
from deployments.denoiser.lora.linear import LoraCarrier


class Fp8Weight(LoraCarrier, nn.Module):
    """A linear's weight as FP8 e4m3 rows `[out, in]` with one float32 scale per output channel; it
    adds a forward's LoRA adapters itself, from the same FP8 rows (`lora.linear`)."""

    lora_input = "fp8"

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.carrier_init()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Weight:
        if linear.bias is not None:
            raise ValueError("Fp8Weight takes bias-free linears (the DiT's block linears have none)")
        with torch.no_grad():
            weight, scale = quantize_rows_reference(linear.weight.float())
        return cls(weight, scale.reshape(1, -1).contiguous())

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def forward(self, x_fp8: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """`[rows, in]` FP8 and `[rows, 1]` float32 scales -> `[rows, out]` bf16."""
        if x_fp8.device.type != "cuda":  # dequantized product, for CPU checks of the fused path
            y = ((x_fp8.float() * x_scale) @ (self.weight.float() * self.scale.t()).t()).to(torch.bfloat16)
        else:
            y = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.scale, out_dtype=torch.bfloat16,
                                 use_fast_accum=True)
        return self.with_lora(y, x_fp8, x_scale)
