"""The ControlNet's blocks on the DiT's own block path: the same fused projections, FP8 weights and
kernels, attention processor and compiled graphs as the DiT's blocks, whichever of them it runs.

A `ZImageControlTransformerBlock` is a DiT block (the same attention, feed-forward, norms and adaLN,
the same forward on its stream `c`) with a linear before it (`before_proj`, the first block of a list
only: `c = before_proj(c) + x`) and one after it (`after_proj`: the hint). So `join_dit` re-classes
each control block as the DiT's block class (Union 1.0's control refiner blocks already are that
block, diffusers' copy of its class) and `control_forward` runs the projections around it; then the
blocks take every step the DiT's blocks took (`optimize_transformer`), read from the DiT itself:

- the DiT's attention processor, one shared instance (real-valued RoPE, its SDPA backends);
- fused projections (`fusion`);
- FP8: the fused FP8 block with the DiT's attention choice (`fused_block`), or torchao's linears
  with the DiT's options (`fp8.quantize_fp8_blocks`);
- the DiT's adapter carriers: where its dense linears are wrapped to carry LoRA adapters
  (`lora.linear.LoraLinear`), the control blocks' are wrapped alike (never given adapters: the
  ControlNet takes none), so that a compiled control block meets the module types the DiT's graphs
  were traced on (the fused blocks' `Fp8Weight`s carry adapters themselves);
- regional compile with the DiT's compiler (`regional_compile.BlockCompiler`): a control block is
  a block of the DiT's class, so it runs the DiT's compiled graphs (per input variant), and the
  warm-up's controlled calls (`denoiser.control_warmup`) leave nothing to compile for a request.

What stays bf16 (in the model's dtype), and why:

- `before_proj` and `after_proj` (dim x dim with a bias; for Union 2.1 at 1024x1024, 2 + 17 GEMMs,
  about 2.4 of the 36 TFLOP a controlled step adds). They read the raw control stream (the DiT
  quantizes only RMS-normalised, modulated rows and SwiGLU outputs, whose rows are bounded) and write
  the hints that go straight into the DiT's residual stream, so the image takes exactly their
  error; at FP8 they would save at most half of their few milliseconds (an estimate from the FLOP
  count, not measured).
- the control embedder (`control_all_x_embedder`, 132 -> dim: about 4 GFLOP, and 132 inputs are no
  multiple of 16 as an FP8 GEMM needs) and each block's adaLN linear, as the DiT's own embedders
  and adaLN stay bf16.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from deployments.denoiser.dit.blocks import iter_blocks
from deployments.denoiser.dit.fp8 import quantize_fp8_blocks, torchao_fp8
from deployments.denoiser.dit.fused_block import FusedFp8Block, fuse_fp8_blocks, unfused_class
from deployments.denoiser.dit.fusion import fuse_block_projections
from deployments.denoiser.dit.regional_compile import block_compiler
from deployments.denoiser.lora.linear import LoraLinear
from deployments.denoiser.lora.slots import carrier_at

PROJECTIONS = ("before_proj", "after_proj")


def control_blocks(controlnet: nn.Module) -> Iterator[nn.Module]:
    """The ControlNet's transformer blocks: its control refiner's (Union 1.0 and 2.1), then its control layers."""
    for name in ("control_noise_refiner", "control_layers"):
        yield from getattr(controlnet, name, None) or []


def join_dit(controlnet: nn.Module, transformer: nn.Module) -> None:
    """Puts the ControlNet's blocks on the path the DiT's blocks run (see the module docstring); in place,
    after the DiT is optimized. Again on the same pair, it changes nothing."""
    dit = list(iter_blocks(transformer))
    model = transformer.layers[0]  # a modulated block, as every control block is
    blocks = list(control_blocks(controlnet))
    for block in blocks:
        children = set(block._modules) - set(PROJECTIONS)
        if children != set(model._modules) or not getattr(block, "modulation", False):
            raise ValueError(f"{type(block).__name__} is not a DiT block with projections: {sorted(block._modules)}")
        if not isinstance(block, FusedFp8Block):
            block.__class__ = unfused_class(model)
        block.attention.set_processor(dit[0].attention.processor)
    if getattr(model.attention, "to_qkv", None) is not None:
        fuse_block_projections(blocks)
    if isinstance(model, FusedFp8Block):
        fuse_fp8_blocks(blocks, "fp8" if model.fp8_attention else "bf16")
    elif torchao_fp8(transformer) is not None and not getattr(controlnet, "_torchao_fp8", None):
        quantize_fp8_blocks(blocks, **torchao_fp8(transformer))
        controlnet._torchao_fp8 = torchao_fp8(transformer)
    carried = [name for name, module in model.named_modules() if isinstance(module, LoraLinear)]
    for block in blocks:
        for path in carried:
            carrier_at(block, path)
    compiler = block_compiler(transformer)
    if compiler is not None:
        compiler.compile(blocks)
