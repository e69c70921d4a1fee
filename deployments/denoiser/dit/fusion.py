"""Fused projections: fewer, larger GEMMs.

`fuse_projections` merges q/k/v into one GEMM and the SwiGLU's w1/w3 into another: better wave
occupancy and, with FP8, one activation quantization instead of three (or two).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deployments.denoiser.dit.blocks import iter_blocks


class FusedFeedForward(nn.Module):
    """SwiGLU with w1 and w3 in one `[2 * hidden, dim]` weight: `w2(silu(x w1) * (x w3))`."""

    def __init__(self, w13: nn.Linear, w2: nn.Linear):
        super().__init__()
        self.w13 = w13
        self.w2 = w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x3 = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(x1) * x3)


def _concat_linears(linears: Sequence[nn.Linear]) -> nn.Linear:
    first = linears[0]
    has_bias = first.bias is not None
    fused = nn.Linear(
        first.in_features,
        sum(lin.out_features for lin in linears),
        bias=has_bias,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears], dim=0))
        if has_bias:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears], dim=0))
    return fused.requires_grad_(False)


def fuse_projections(transformer: nn.Module) -> nn.Module:
    """Merges q/k/v into `to_qkv` and w1/w3 into `w13` in every block, freeing the originals.

    Must run before `quantize_fp8` (the fused weights are what gets quantized) and needs
    `RealRopeAttnProcessor` (diffusers' processor reads `to_q`/`to_k`/`to_v`).
    """
    fuse_block_projections(iter_blocks(transformer))
    return transformer


def fuse_block_projections(blocks: Iterable[nn.Module]) -> None:
    """`fuse_projections` for the given blocks (the ControlNet's join the DiT's: `denoiser.control_blocks`)."""
    for block in blocks:
        attn = block.attention
        if getattr(attn, "to_qkv", None) is None:
            attn.to_qkv = _concat_linears([attn.to_q, attn.to_k, attn.to_v])
            del attn.to_q, attn.to_k, attn.to_v
            attn.fused_projections = True
        ff = block.feed_forward
        if not isinstance(ff, FusedFeedForward):
            block.feed_forward = FusedFeedForward(_concat_linears([ff.w1, ff.w3]), ff.w2)
