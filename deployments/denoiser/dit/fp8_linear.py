"""FP8 linears on activations that arrive already quantized.

torchao's FP8 linear quantizes its own input, so whatever comes before it (norm, modulation, SwiGLU)
is a separate pass over the row. The fused path (`fused_block`) quantizes in the kernel that makes
the row (`fused_quant`) and hands the FP8 row and its scale here (`fp8_gemm`).

With LoRA (`lora.slots`), the weight lives as the first rows of a longer buffer whose last rows (the
tail) hold a forward's adapter A factors: a forward with adapters runs one GEMM over the whole buffer
(`lora.ops.fp8_lora_linear`); one without runs the weight's rows alone, as before.
"""

from __future__ import annotations

import torch
from torch import nn

from deployments.denoiser.dit.fp8_gemm import fp8_gemm
from deployments.denoiser.dit.fused_quant import quantize_rows_reference
from deployments.denoiser.lora.linear import LoraCarrier
from deployments.denoiser.lora.ops import fp8_lora_linear


class Fp8Weight(LoraCarrier, nn.Module):
    """A linear's weight as FP8 e4m3 rows `[out, in]` with one float32 scale per output channel; it
    adds a forward's LoRA adapters itself, from the same FP8 rows (`lora.linear`)."""

    lora_input = "fp8"

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.carrier_init()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    def with_tail(self, extended: torch.Tensor, extended_scale: torch.Tensor) -> None:
        """Moves the weight and its scales into the first rows of `extended` `[out + tail, in]` and
        `extended_scale` `[1, out + tail]`, whose last `tail` rows will hold a forward's A factors and
        their scales (`lora.slots.LoraSlots`); `weight` and `scale` stay views of the same memory."""
        out = self.out_features
        if extended.shape[0] <= out or extended.shape[1] != self.in_features:
            raise ValueError(f"an extended weight for [{out}, {self.in_features}] needs more rows, got {tuple(extended.shape)}")
        extended[:out].copy_(self.weight)
        extended_scale[:, :out].copy_(self.scale)
        # the strides of a weight of its own ([1, out] as (out, 1), not (out + tail, 1)): the ControlNet's
        # blocks, whose weights have no tail, run the same compiled graphs, which guard on strides
        self.weight, self.scale = extended[:out], extended_scale[0, :out].view(1, out)
        self.register_buffer("extended", extended, persistent=False)
        self.register_buffer("extended_scale", extended_scale, persistent=False)

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
        """`[rows, in]` FP8 and `[rows, 1]` float32 scales -> `[rows, out]` bf16 (with adapters and a
        tail, rows `out + tail` apart: the next kernels read them in place). Only `LoraSlots` turns
        `lora_on` on, and it gives every FP8 weight its tail first."""
        if self.lora_on:
            return fp8_lora_linear(x_fp8, x_scale, self.extended, self.extended_scale, self.out_features,
                                   self.lora_slot)
        return fp8_gemm(x_fp8, x_scale, self.weight, self.scale)
