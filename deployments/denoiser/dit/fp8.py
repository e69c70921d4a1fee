"""FP8 block linears through torchao.

The block linears are about 85% of a step's FLOPs at 1024x1024 (4.8e13 of 5.71e13, counted in
RESULTS.md's earlier round; attention is the rest and stays bf16). Eager FP8 is slower than bf16 (the quantization kernels are not fused), so FP8 is meant to
be used with regional compilation (`regional_compile`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

Fp8Scaling = Literal["row", "tensor"]

FP8_MIN_CAPABILITY = (8, 9)
FP8_ROW_AMAX_FLOOR = 1e-12
# Names of the linears that FP8 rewrites, relative to a block, and relative to the transformer.
_IN_BLOCK = r"(?:attention\.(?:to_q|to_k|to_v|to_qkv|to_out\.0)|feed_forward\.(?:w1|w2|w3|w13))"
_BLOCK_LINEAR = re.compile(rf"^(?:noise_refiner|context_refiner|siglip_refiner|layers)\.\d+\.{_IN_BLOCK}$")
_LINEAR_IN_BLOCK = re.compile(rf"^{_IN_BLOCK}$")


class Fp8UnsupportedError(RuntimeError):
    """FP8 GEMMs need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)."""


def check_fp8_support(device: torch.device) -> None:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise Fp8UnsupportedError(
            f"precision 'fp8' needs the transformer on a CUDA GPU with compute capability >= "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} (H100/H200, L40S, RTX 40xx); it is on "
            f"{device.type!r}{'' if torch.cuda.is_available() else ' and no CUDA device is visible'}. "
            "Use precision 'bf16'."
        )
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < FP8_MIN_CAPABILITY:
        raise Fp8UnsupportedError(
            f"precision 'fp8' needs compute capability >= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}; "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. Use precision 'bf16'."
        )


def is_block_linear(module: nn.Module, fqn: str) -> bool:
    """The big linears inside the repeated blocks; embedders, adaLN and the final layer stay bf16."""
    return isinstance(module, nn.Linear) and _BLOCK_LINEAR.match(fqn) is not None


def quantize_fp8(transformer: nn.Module, *, tune_inductor: bool = False, scaling: Fp8Scaling = "row") -> nn.Module:
    """torchao FP8 (e4m3) with dynamic activation scales: `scaling="row"` scales per token (activations)
    and per output channel (weights); `"tensor"` uses one scale per tensor (cuBLAS's plain FP8 GEMM,
    coarser where one token has outliers).

    Only the block linears (attention q/k/v/out, feed-forward w1/w2/w3, or their fused forms);
    timestep, caption and patch embedders, adaLN modulation and the final layer keep bf16.
    `tune_inductor` lets torchao switch on inductor's coordinate-descent tuning, which adds
    minutes of compile time for a few percent; it is off by default. The choice is kept on the
    transformer (`torchao_fp8`), so that blocks joining it later get the same (`quantize_fp8_blocks`).
    """
    check_fp8_support(next(transformer.parameters()).device)
    targets = [(name, mod) for name, mod in transformer.named_modules() if is_block_linear(mod, name)]
    _quantize(transformer, targets, is_block_linear, tune_inductor, scaling)
    transformer._torchao_fp8 = {"tune_inductor": tune_inductor, "scaling": scaling}
    logger.info("FP8 (%s scaling): %d block linears quantized", scaling, len(targets))
    return transformer


def torchao_fp8(transformer: nn.Module) -> dict | None:
    """The options `quantize_fp8` ran with on this transformer (None if it did not)."""
    return getattr(transformer, "_torchao_fp8", None)


def quantize_fp8_blocks(blocks: Iterable[nn.Module], *, tune_inductor: bool = False,
                        scaling: Fp8Scaling = "row") -> None:
    """`quantize_fp8` for the given blocks (the ControlNet's join the DiT's: `denoiser.control_blocks`)."""
    for block in blocks:
        check_fp8_support(next(block.parameters()).device)
        targets = [(name, mod) for name, mod in block.named_modules() if _linear_in_block(mod, name)]
        _quantize(block, targets, _linear_in_block, tune_inductor, scaling)


def _linear_in_block(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and _LINEAR_IN_BLOCK.match(fqn) is not None


def _quantize(module: nn.Module, targets: list, filter_fn, tune_inductor: bool, scaling: Fp8Scaling) -> None:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    if not targets:
        raise ValueError(f"{type(module).__name__} has no block linears to quantize")
    wrong = sorted({str(mod.weight.dtype) for _, mod in targets if mod.weight.dtype != torch.bfloat16})
    if wrong:
        raise ValueError(f"FP8 rowwise quantization needs bfloat16 weights; the block linears are {', '.join(wrong)}")
    # A floor under each row's absolute maximum: an all-zero row (padding in a ragged batch, or a
    # zero pad token) would otherwise get scale 0 and turn into NaN, which attention then spreads to
    # every real token through the masked columns (0 x NaN = NaN).
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow() if scaling == "row" else PerTensor(),
        set_inductor_config=tune_inductor,
        activation_value_lb=FP8_ROW_AMAX_FLOOR,
    )
    quantize_(module, config, filter_fn=filter_fn)
