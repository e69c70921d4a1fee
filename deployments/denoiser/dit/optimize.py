"""The DiT's speed-ups composed: real RoPE, fused projections, FP8, regional compile, in that order."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

from torch import nn

from deployments.denoiser.dit.blocks import model_device_dtype
from deployments.denoiser.dit.fp8 import Fp8Scaling, check_fp8_support, quantize_fp8
from deployments.denoiser.dit.fused_block import install_fused_blocks
from deployments.denoiser.dit.fusion import fuse_projections
from deployments.denoiser.dit.regional_compile import compile_blocks
from deployments.denoiser.dit.rotary import AttentionChoice, install_real_rope
from deployments.denoiser.lora.slots import install_lora

Precision = Literal["bf16", "fp8"]
# FP8 kernels: torchao's linears with inductor's norm/quantization kernels, or our fused Triton
# kernels with FP8 attention (`fused`) or bf16 attention (`fused-bf16-attention`), see `fused_block`.
Fp8Kernels = Literal["inductor", "fused", "fused-bf16-attention"]


def optimize_transformer(
    transformer: nn.Module,
    precision: Precision = "bf16",
    compile: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    fuse: bool = True,
    attention: AttentionChoice = "auto",
    dynamic: bool | None = True,
    tune_inductor: bool = False,
    fp8_scaling: Fp8Scaling = "row",
    backend: str | Callable[..., Any] = "inductor",
    fp8_kernels: Fp8Kernels = "inductor",
    lora: bool = True,
) -> nn.Module:
    """Real RoPE, then (optionally) fused projections, then FP8, then regional compile; in place.

    The order matters: the real-valued processor must be in place before fusion (diffusers' reads
    the unfused projections) and before compiling (complex RoPE does not compile); fusion before FP8
    so that the fused weights are quantized; FP8 before compiling so the graphs trace the FP8 GEMMs.
    `precision="bf16"` keeps the weights in the dtype they were loaded in (bf16 in production,
    float32 in CPU tests). `fp8_kernels` picks how FP8 runs (`Fp8Kernels`). Returns the same module,
    still called as diffusers calls it. `lora` makes the block linears carry per-job adapters
    (`lora.slots`: dense linears wrapped, the fused blocks' `Fp8Weight`s as they are) after FP8 and
    before compiling, so the compiled blocks take the adapters' factors as inputs.
    """
    if precision not in ("bf16", "fp8"):
        raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")
    if precision == "fp8":  # fail before touching the module
        check_fp8_support(model_device_dtype(transformer)[0])
    install_real_rope(transformer, attention)
    if fuse:
        fuse_projections(transformer)
    if fp8_kernels not in ("inductor", "fused", "fused-bf16-attention"):
        raise ValueError(f"fp8_kernels must be 'inductor', 'fused' or 'fused-bf16-attention', got {fp8_kernels!r}")
    if precision == "fp8" and fp8_kernels == "inductor":
        quantize_fp8(transformer, tune_inductor=tune_inductor, scaling=fp8_scaling)
    elif precision == "fp8":
        if not fuse:
            raise ValueError("fused FP8 kernels need fused projections (fuse=True)")
        install_fused_blocks(transformer, attention="bf16" if fp8_kernels == "fused-bf16-attention" else "fp8")
    if lora:
        install_lora(transformer)
    if compile:
        compile_blocks(transformer, cache_dir, dynamic=dynamic, backend=backend, artifacts_name=f"dit-{precision}")
    return transformer


def optimize_as_resolved(transformer: nn.Module, speed, cache_dir: str | os.PathLike[str] | None = None,
                         attention: AttentionChoice = "cudnn") -> nn.Module:
    """The Denoiser's DiT for a resolved `speed` (`deployments.speed.Speed`: each setting's value on
    this device, `auto` resolved): on a GPU `optimize_transformer` with its precision, compile and FP8
    kernels; the CPU runs the model as loaded. What the Denoiser and the benchmarks both call, so a
    benchmark measures the path a replica serves."""
    if speed.hardware.kind != "cuda":
        return transformer
    return optimize_transformer(transformer, speed.precision.value, speed.compile.value, cache_dir,
                                attention=attention, fp8_kernels=speed.fp8_kernels.value or "inductor")


def graphed_transformer_fn(transformer: nn.Module, speed, device, control=None):
    """The DiT call with its CUDA graphs where `speed` has them (None where not): batch-1 forwards,
    with or without LoRA adapters, controlled by `control` (the `ControlNetRunner`) or not, per
    caption bucket (`step_graphs`)."""
    from deployments.denoiser.dit.caption_buckets import padded_transformer_fn
    from deployments.denoiser.dit.step_graphs import GraphedTransformerFn
    from deployments.denoiser.loop import diffusers_transformer_fn

    if not speed.dit_cuda_graphs.value:
        return None
    return GraphedTransformerFn.on(diffusers_transformer_fn(transformer), device,
                                   padded=padded_transformer_fn(transformer),
                                   lora=getattr(transformer, "_lora_slots", None), control=control)
