"""An adapter's factors, and the model's linears they must fit.

Adapters name the transformer's unfused linears (`layers.3.attention.to_q`, `...feed_forward.w1`);
our GPU blocks run q/k/v as one `to_qkv` GEMM and w1/w3 as one `w13` (`dit.fusion`). A slot is one
linear the model really runs; its parts are the adapter-visible linears it computes, at their row
offsets in its output (each part gets its own update: `layout`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from deployments.denoiser.dit.blocks import BLOCK_LISTS
from deployments.denoiser.lora.errors import LoraFitError

_ADAPTABLE = re.compile(
    r"^(?:noise_refiner|context_refiner|siglip_refiner|layers)\.\d+\."
    r"(?:attention\.(?:to_q|to_k|to_v|to_out\.0)|feed_forward\.(?:w1|w2|w3))$"
)


@dataclass(frozen=True)
class SlotPart:
    name: str  # the unfused linear's path, as adapters name it
    offset: int  # first output row of this part in the slot's output
    out_features: int


@dataclass(frozen=True)
class Slot:
    path: str  # the module the model runs
    in_features: int
    parts: tuple[SlotPart, ...]


def model_slots(transformer: nn.Module) -> dict[str, Slot]:
    """Every adaptable linear of the transformer as it runs now (fused or not)."""
    slots: dict[str, Slot] = {}

    def add(path: str, linear: nn.Module, names: list[str]) -> None:
        linear = getattr(linear, "base", linear)  # already wrapped by `linear.LoraLinear`
        size = linear.out_features // len(names)
        if size * len(names) != linear.out_features:
            raise ValueError(f"{path}: {linear.out_features} outputs do not split into {names}")
        parts = tuple(SlotPart(n, i * size, size) for i, n in enumerate(names))
        slots[path] = Slot(path, linear.in_features, parts)

    for list_name in BLOCK_LISTS:
        for index, block in enumerate(getattr(transformer, list_name, None) or []):
            prefix = f"{list_name}.{index}"
            attn, ff = block.attention, block.feed_forward
            if getattr(attn, "to_qkv", None) is not None:
                add(f"{prefix}.attention.to_qkv", attn.to_qkv, [f"{prefix}.attention.to_{p}" for p in "qkv"])
            else:
                for p in "qkv":
                    add(f"{prefix}.attention.to_{p}", getattr(attn, f"to_{p}"), [f"{prefix}.attention.to_{p}"])
            add(f"{prefix}.attention.to_out.0", attn.to_out[0], [f"{prefix}.attention.to_out.0"])
            if getattr(ff, "w13", None) is not None:
                add(f"{prefix}.feed_forward.w13", ff.w13, [f"{prefix}.feed_forward.w{i}" for i in (1, 3)])
            else:
                for i in (1, 3):
                    add(f"{prefix}.feed_forward.w{i}", getattr(ff, f"w{i}"), [f"{prefix}.feed_forward.w{i}"])
            add(f"{prefix}.feed_forward.w2", ff.w2, [f"{prefix}.feed_forward.w2"])
    return slots


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter's factors by unfused module path: `(A [r, in], B [out, r])`, scaling folded into B."""

    name: str
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.factors.values())

    @property
    def targets(self) -> list[str]:
        """Module names within a block (`attention.to_q`, `feed_forward.w1`, ...), sorted."""
        return sorted({path.split(".", 2)[2] for path in self.factors})

    @classmethod
    def from_state_dict(cls, name: str, state: Mapping[str, torch.Tensor], scaling: float = 1.0,
                        max_rank: int | None = None) -> LoraAdapter:
        """From diffusers keys (`convert.to_diffusers_keys`); pairs each `lora_A` with its `lora_B`."""
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in state:
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removesuffix(".lora_A.weight")
            b_key = f"{module}.lora_B.weight"
            a, b = state[key], state.get(b_key)
            if b is None:
                raise LoraFitError(key, "has no matching lora_B")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise LoraFitError(key, f"factor shapes {tuple(a.shape)} and {tuple(b.shape)} do not pair")
            if max_rank is not None and a.shape[0] > max_rank:
                raise LoraFitError(key, f"rank {a.shape[0]} is over the server's cap of {max_rank}")
            factors[module] = (a, b * scaling if scaling != 1.0 else b)
        for key in state:
            if key.endswith(".lora_B.weight") and key.removesuffix(".lora_B.weight") not in factors:
                raise LoraFitError(key, "has no matching lora_A")
        if not factors:
            raise LoraFitError("<file>", "no LoRA factors in the file")
        return cls(name, factors)

    def check_fit(self, slots: Mapping[str, Slot]) -> None:
        """Raises `LoraFitError` naming the first module (in the file's order) the model lacks or whose
        shapes differ from the model's linear."""
        parts = {part.name: (slot.in_features, part.out_features) for slot in slots.values() for part in slot.parts}
        for module, (a, b) in self.factors.items():
            key = f"{module}.lora_A.weight"
            if not _ADAPTABLE.match(module) or module not in parts:
                raise LoraFitError(key, "is not an attention or feed-forward linear of this model")
            in_features, out_features = parts[module]
            if a.shape[1] != in_features or b.shape[0] != out_features:
                raise LoraFitError(key, f"shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the linear "
                                        f"[{out_features}, {in_features}]")
