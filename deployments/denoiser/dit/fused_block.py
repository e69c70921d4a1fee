"""The DiT block on fused FP8 kernels: what `ZImageTransformerBlock.forward` computes, in fewer passes.

One block, per token row (the kernels are in `fused_quant`, `fp8_attention` and `fp8_linear`):

    norm_modulate_quant(x)            -> FP8 row  -> q/k/v GEMM
    qkv_norm_rope_quant(q, k, v)      -> FP8 q/k/v -> cuDNN FP8 attention -> FP8 row -> output GEMM
    gated_residual(x, attn) + next norm_modulate_quant -> x, FP8 row -> w1/w3 GEMM
    swiglu_quant                      -> FP8 row  -> w2 GEMM
    gated_residual(x, ffn)            -> x

against inductor's kernels for the same block, which read each row twice for a norm or an amax and
quantize in separate passes. Attention runs in FP8 where cuDNN's FP8 SDPA is available
(`attention="fp8"`), ragged batches too (the mask becomes one length per item, see `fp8_attention`);
`attention="bf16"` runs the stock processor's bf16 attention and quantizes its output rows in
torch. The block stays compiled regionally (`regional_compile`): the Triton kernels and cuDNN's
attention are custom ops inside the graph, and inductor fuses the small modulation arithmetic
around them.

With this forward's LoRA adapters (`lora.slots`), each linear runs one GEMM over its weight and the
adapters' A, and the kernel after it adds the up-projection as it reads the GEMM's output
(`lora.consumers`); with the bf16 attention, q/k/v adds it in its linear (`lora.ops`).

`install_fused_blocks` swaps each block's class and replaces its linears with `Fp8Weight`s; it
needs fused projections (`fusion`) and the real-valued RoPE tables (`rotary`) in place first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from deployments.denoiser.dit.blocks import iter_blocks
from deployments.denoiser.dit.fp8_attention import (
    cudnn_fp8_attention_available,
    prefix_lengths,
    qk_static_scales,
    qkv_norm_rope_quant,
    sdpa_fp8,
)
from deployments.denoiser.dit.fp8_linear import Fp8Weight
from deployments.denoiser.dit.rotary import RealRopeAttnProcessor
from deployments.denoiser.dit.fused_quant import gated_residual, norm_modulate_quant, quantize_rows_reference, swiglu_quant
from deployments.denoiser.lora.consumers import qkv_norm_rope_quant_lora, swiglu_quant_lora
from deployments.denoiser.lora.residual_consumer import gated_residual_lora

logger = logging.getLogger(__name__)

FusedAttention = Literal["fp8", "bf16"]


class FusedFp8Block(nn.Module):
    """Stands in for `ZImageTransformerBlock` (its instances are re-classed, keeping their modules)."""

    fp8_attention: bool = True

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        freqs_cis: torch.Tensor,
        adaln_input: torch.Tensor | None = None,
        noise_mask: torch.Tensor | None = None,
        adaln_noisy: torch.Tensor | None = None,
        adaln_clean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if noise_mask is not None:
            raise NotImplementedError("the fused FP8 block has no per-token (noisy/clean) modulation")
        batch, seq, dim = x.shape
        rows = batch * seq
        attn, ff = self.attention, self.feed_forward
        scale_msa = gate_msa = scale_mlp = gate_mlp = None
        if self.modulation:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
            gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
            scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp

        x = x.contiguous()
        xq, xs = norm_modulate_quant(x, self.attention_norm1.weight, scale_msa, self.attention_norm1.eps)
        if self.fp8_attention:
            # `[B, S, D/2, 2]` -> `[B*S, D/2, 2]` by its own dims: a reshape to x's row count would tie
            # the table's dynamic sizes to x's, and dynamo would specialize the sequence length
            rope = freqs_cis.flatten(0, 1).contiguous()
            norms = (attn.norm_q.weight, attn.norm_k.weight, rope, attn.qk_descale, attn.heads, attn.norm_q.eps,
                     attn.norm_k.eps)
            if attn.to_qkv.lora_on:  # the adapters' update inside the kernel that reads q/k/v anyway
                q, k, v, v_descale = qkv_norm_rope_quant_lora(attn.to_qkv, xq, xs, *norms)
            else:
                q, k, v, v_descale = qkv_norm_rope_quant(attn.to_qkv(xq, xs), *norms)
            shape = (batch, seq, dim)
            seq_lens = None if attn_mask is None else prefix_lengths(attn_mask)
            out = sdpa_fp8(q.view(shape), k.view(shape), v.view(shape), attn.qk_descale[0:1], attn.qk_descale[1:2],
                           v_descale, attn.heads, seq_lens)
            oq, os = out.view(rows, dim), v_descale.reshape(1, 1).expand(rows, 1).contiguous()
        else:
            # the stock processor's attention (norms, RoPE, SDPA in its backend order) on our q/k/v
            qkv = attn.to_qkv(xq, xs)
            out = attn.processor.attend(attn, *qkv.view(batch, seq, -1).chunk(3, dim=-1), attn_mask, freqs_cis)
            oq, os = quantize_rows_reference(out.reshape(rows, dim).float())

        to_out, ffn_norm = attn.to_out[0], (self.ffn_norm1.weight, scale_mlp, self.ffn_norm1.eps)
        if to_out.lora_on:  # with adapters, each kernel after a linear adds the linear's update as it reads
            x, fq, fs = gated_residual_lora(x, to_out, oq, os, self.attention_norm2.weight, gate_msa,
                                            self.attention_norm2.eps, next_norm=ffn_norm)
            hq, hs = swiglu_quant_lora(ff.w13, fq, fs)
            x, _, _ = gated_residual_lora(x, ff.w2, hq, hs, self.ffn_norm2.weight, gate_mlp, self.ffn_norm2.eps)
            return x
        x, fq, fs = gated_residual(x, to_out(oq, os).view(batch, seq, dim), self.attention_norm2.weight, gate_msa,
                                   self.attention_norm2.eps, next_norm=ffn_norm)
        hq, hs = swiglu_quant(ff.w13(fq, fs))
        x, _, _ = gated_residual(x, ff.w2(hq, hs).view(batch, seq, dim), self.ffn_norm2.weight, gate_mlp,
                                 self.ffn_norm2.eps)
        return x


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(block_class: type) -> type:
    """One fused class per block class, so every block shares one compiled graph."""
    if block_class not in _FUSED_CLASSES:
        _FUSED_CLASSES[block_class] = type("FusedFp8Block", (FusedFp8Block, block_class), {})
    return _FUSED_CLASSES[block_class]


def install_fused_blocks(transformer: nn.Module, attention: FusedAttention = "fp8") -> nn.Module:
    """Re-classes every block as `FusedFp8Block` and quantizes its fused linears to `Fp8Weight`.

    Replaces torchao's quantization for these linears (it would quantize their inputs again).
    `attention="fp8"` needs cuDNN's frontend and a Hopper GPU; without them it raises, rather than
    quietly running bf16 attention under a name that says FP8.
    """
    if attention not in ("fp8", "bf16"):
        raise ValueError(f"attention must be 'fp8' or 'bf16', got {attention!r}")
    blocks = list(iter_blocks(transformer))
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no transformer blocks")
    device = next(transformer.parameters()).device
    if attention == "fp8" and not cudnn_fp8_attention_available(device):
        raise RuntimeError(
            "FP8 attention needs a Hopper GPU (sm_90), Triton and cuDNN's frontend (pip install "
            "nvidia-cudnn-frontend); use fused attention 'bf16'"
        )
    fuse_fp8_blocks(blocks, attention)
    names = set(getattr(transformer, "_repeated_blocks", None) or ["ZImageTransformerBlock"])
    transformer._repeated_blocks = sorted(names | {"FusedFp8Block"})
    logger.info("fused FP8 blocks: %d blocks, attention %s", len(blocks), attention)
    return transformer


def fuse_fp8_blocks(blocks: Iterable[nn.Module], attention: FusedAttention) -> None:
    """`install_fused_blocks` for the given blocks, once the device is known to run `attention` (the
    ControlNet's blocks join the DiT's this way: `denoiser.control_blocks`)."""
    for block in blocks:
        attn, ff = block.attention, block.feed_forward
        if getattr(attn, "to_qkv", None) is None or not hasattr(ff, "w13"):
            raise ValueError("fused FP8 blocks need fused projections (fuse_projections) first")
        if not isinstance(attn.processor, RealRopeAttnProcessor):  # its `attend` runs masked calls
            raise ValueError("fused FP8 blocks need the real-valued RoPE processor (install_real_rope) first")
        if not isinstance(attn.to_qkv, Fp8Weight):
            attn.to_qkv = Fp8Weight.from_linear(attn.to_qkv)
            attn.to_out[0] = Fp8Weight.from_linear(attn.to_out[0])
            ff.w13 = Fp8Weight.from_linear(ff.w13)
            ff.w2 = Fp8Weight.from_linear(ff.w2)
            attn.register_buffer("qk_descale", qk_static_scales(attn.norm_q.weight, attn.norm_k.weight))
        if not isinstance(block, FusedFp8Block):
            block.__class__ = _fused_class(type(block))
        block.fp8_attention = attention == "fp8"


def unfused_class(block: nn.Module) -> type:
    """The block's class before `install_fused_blocks` re-classed it (its own class if it did not)."""
    return next(cls for cls in type(block).__mro__ if not issubclass(cls, FusedFp8Block))
