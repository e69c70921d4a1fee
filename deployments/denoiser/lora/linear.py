"""The linears that carry a forward's adapters: the base output, then the unmerged update (`ops`).

Two kernel families, one update:
- `Fp8Weight` (the fused FP8 blocks, `dit.fp8_linear`) takes FP8 rows and their scales: with
  adapters it runs one GEMM over its weight and the forward's A after it (`ops.fp8_lora_linear`), so
  the down-projection reads those same FP8 rows in the base GEMM;
- `LoraLinear` wraps any other linear (bf16 or float32 `nn.Linear`, torchao's FP8 linear): the
  down-projection reads its dense input.

Both inherit `LoraCarrier`: `lora_on` says whether this forward has adapters, and the update op
finds the forward's factors by the linear's `lora_slot` id (`ops`, filled by `slots.LoraSlots.using`),
so a compiled block never sees the factors themselves and a new adapter, rank or mix compiles
nothing. A forward without adapters runs exactly the base linear: `lora_on` is resolved when
torch.compile traces the block (a guard, so two graphs per block shape: with and without adapters,
not a branch in either) and CUDA-graph replays run no Python at all.
"""

from __future__ import annotations

import torch
from torch import nn

from deployments.denoiser.lora.ops import add_lora


class LoraCarrier:
    """A linear that adds one forward's adapters to its output (see the module docstring)."""

    lora_input = "dense"  # or "fp8": the linear takes FP8 rows with their scales
    lora_on = False  # each carrier sets its own at construction (`carrier_init`)
    lora_slot: torch.Tensor  # a CPU int64 scalar, set by `slots.LoraSlots`

    def carrier_init(self) -> None:
        """`lora_on` as the carrier's own attribute from the start, whether or not `slots.LoraSlots`
        ever holds it: a compiled block guards on where the attribute lives, so the DiT's carriers and
        the ControlNet's (`denoiser.control_blocks`, never given adapters) share its graphs."""
        self.lora_on = False

class LoraLinear(LoraCarrier, nn.Module):
    """Wraps a linear taking dense rows (`[B, S, in]`)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.carrier_init()
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
        y = self.base(x)
        return add_lora(y, x, None, self.lora_slot) if self.lora_on else y
