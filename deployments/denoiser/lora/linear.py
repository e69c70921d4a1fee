"""The linears that carry a forward's adapters: the base output, then the unmerged update (`ops`).

Two kernel families, one update:
- `Fp8Weight` (the fused FP8 blocks, `dit.fp8_linear`) takes FP8 rows and their scales: the update's
  down-projection reads those same FP8 rows;
- `LoraLinear` wraps any other linear (bf16 or float32 `nn.Linear`, torchao's FP8 linear): the
  down-projection reads its dense input.

Both inherit `LoraCarrier`: the factors are tensors set on the module for one forward
(`slots.LoraSlots.using`), never constants, so a compiled block reads them as graph inputs and a
new adapter, rank or mix compiles nothing. Between forwards they are None, and a forward without
adapters runs exactly the base linear: the `is None` test is resolved when torch.compile traces the
block (a guard, not a branch in the graph) and CUDA-graph replays run no Python at all.
"""

from __future__ import annotations

import torch
from torch import nn

from deployments.denoiser.lora.ops import add_lora


class LoraCarrier:
    """A linear that adds one forward's adapters to its output (see the module docstring)."""

    lora_input = "dense"  # or "fp8": the linear takes FP8 rows with their scales
    lora_a: torch.Tensor | None = None  # [G, P, R, in]
    lora_a_scale: torch.Tensor | None = None  # [G, P, R]
    lora_b: torch.Tensor | None = None  # [G, P, out_p, R]
    lora_groups: torch.Tensor | None = None  # [B] int64

    def with_lora(self, y: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.lora_a is None:
            return y
        return add_lora(y, x, x_scale, self.lora_a, self.lora_a_scale, self.lora_b, self.lora_groups)


class LoraLinear(LoraCarrier, nn.Module):
    """Wraps a linear taking dense rows (`[B, S, in]`)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.with_lora(self.base(x), x)
