"""An adapter's factors laid out the way a forward reads them: stacked over the blocks, by slot kind.

The DiT's blocks all have the same linears (`to_qkv`, `to_out.0`, `w13`, `w2`, or unfused `to_q`...
where projections are not fused); a *slot kind* is one of them across every block of the same
shapes. An adapter's factors for a kind are three tensors for all blocks at once:

    a        [n_blocks, P, r, in]    A of each part (q, k, v; w1, w3; or the one part), FP8 or the
                                     model's dtype
    a_scale  [n_blocks, P, r]        float32: A's row scales where A is FP8, else ones
    b        [n_blocks, P, out_p, r] B of each part, in the model's dtype

with P the kind's parts and r the adapter's rank for that kind, padded up to `RANK_MULTIPLE` (the
FP8 GEMMs take multiples of 16, and no compiled graph sees a rank of 1). Parts and blocks the adapter
leaves alone hold zeros. So a forward's factors are a few tensors per kind (`slots.LoraSlots`), a
block's are views into them, and one part's update never multiplies another part's zeros (the old
block-diagonal `B` of a fused q/k/v did, three times the up-projection's work).

Where the linears take FP8 rows (the fused FP8 blocks), A is FP8 with one scale per rank row, so the
down-projection is an FP8 GEMM on the rows the block already quantized (`ops`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from deployments.denoiser.lora.adapter import LoraAdapter, Slot

RANK_MULTIPLE = 16
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-12


def padded_rank(rank: int) -> int:
    return max(RANK_MULTIPLE, -(-rank // RANK_MULTIPLE) * RANK_MULTIPLE)


@dataclass(frozen=True)
class SlotKind:
    """One linear of every block (the same name within a block and the same shapes)."""

    key: str  # its name within a block ("attention.to_qkv"), suffixed where blocks differ in shape
    name: str  # within a block: "attention.to_qkv"
    in_features: int
    part_out: int  # output features of each part
    part_names: tuple[str, ...]  # within a block: ("attention.to_q", "attention.to_k", "attention.to_v")
    blocks: tuple[str, ...]  # the blocks ("noise_refiner.0", ..., "layers.29"), in the model's order

    @property
    def parts(self) -> int:
        return len(self.part_names)

    @property
    def paths(self) -> tuple[str, ...]:
        """The slot of each block."""
        return tuple(f"{block}.{self.name}" for block in self.blocks)


def _split(path: str) -> tuple[str, str]:
    """("layers.3", "attention.to_qkv") from "layers.3.attention.to_qkv"."""
    list_name, index, name = path.split(".", 2)
    return f"{list_name}.{index}", name


def slot_kinds(slots: Mapping[str, Slot]) -> dict[str, SlotKind]:
    """The kinds of `slots` (as `adapter.model_slots` lists them), keyed by name (and shapes, where
    blocks of one model differ)."""
    grouped: dict[tuple, list[Slot]] = {}
    for slot in slots.values():
        key = (_split(slot.path)[1], slot.in_features, slot.parts[0].out_features)
        grouped.setdefault(key, []).append(slot)
    names = [name for name, _, _ in grouped]
    kinds = {}
    for (name, in_features, part_out), members in grouped.items():
        key = name if names.count(name) == 1 else f"{name}@{in_features}x{part_out}"
        part_names = tuple(_split(p.name)[1] for p in members[0].parts)
        kinds[key] = SlotKind(key, name, in_features, part_out, part_names, tuple(_split(s.path)[0] for s in members))
    return kinds


@dataclass(frozen=True)
class KindFactors:
    a: torch.Tensor  # [n, P, r, in]
    a_scale: torch.Tensor  # [n, P, r] float32
    b: torch.Tensor  # [n, P, out_p, r]

    @property
    def rank(self) -> int:
        return self.a.shape[2]

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.a_scale.nbytes + self.b.nbytes


@dataclass(frozen=True)
class LaidOutAdapter:
    """An adapter ready to run: its `KindFactors` by kind name, on the model's device."""

    name: str
    kinds: Mapping[str, KindFactors]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.kinds.values())

    @property
    def rank(self) -> int:
        """The largest padded rank of any kind (what a forward's buffers must hold)."""
        return max((f.rank for f in self.kinds.values()), default=0)


def quantize_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 rows of float32 `a` (last dim) and their float32 scales `amax / 448`."""
    scale = a.abs().amax(dim=-1).clamp_min(AMAX_FLOOR) / FP8_MAX
    return (a / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def lay_out(adapter: LoraAdapter, slots: Mapping[str, Slot], kinds: Mapping[str, SlotKind],
            device: torch.device, dtype: torch.dtype, fp8: bool) -> LaidOutAdapter:
    """`adapter`'s factors as `KindFactors` per kind it touches (checked against `slots` first); with
    `fp8`, A in FP8 with row scales (for linears that take FP8 rows)."""
    adapter.check_fit(slots)
    out = {}
    for kind in kinds.values():
        present = []  # (block index, part index, A [r, in], B [out, r])
        for block, prefix in enumerate(kind.blocks):
            for part, part_name in enumerate(kind.part_names):
                factors = adapter.factors.get(f"{prefix}.{part_name}")
                if factors is not None:
                    present.append((block, part, *factors))
        if not present:
            continue
        rank = padded_rank(max(a.shape[0] for _, _, a, _ in present))
        n = len(kind.blocks)
        a = torch.zeros(n, kind.parts, rank, kind.in_features)
        b = torch.zeros(n, kind.parts, kind.part_out, rank)
        for block, part, a_part, b_part in present:
            a[block, part, : a_part.shape[0]] = a_part.float()
            b[block, part, :, : b_part.shape[1]] = b_part.float()
        a = a.to(device)
        if fp8:
            a, a_scale = quantize_rows(a)
        else:
            a, a_scale = a.to(dtype), torch.ones(a.shape[:3], device=device)
        out[kind.key] = KindFactors(a.contiguous(), a_scale.contiguous(), b.to(device, dtype).contiguous())
    return LaidOutAdapter(adapter.name, out)


def zero_adapter(kinds: Mapping[str, SlotKind], rank: int, device: torch.device, dtype: torch.dtype,
                 fp8: bool, name: str = "zero") -> LaidOutAdapter:
    """Zero factors of `rank` (padded) on every kind: the warm-up's stand-in for any adapter."""
    rank = padded_rank(rank)
    out = {}
    for kind in kinds.values():
        n = len(kind.blocks)
        a = torch.zeros(n, kind.parts, rank, kind.in_features, device=device, dtype=FP8_DTYPE if fp8 else dtype)
        out[kind.key] = KindFactors(a, torch.zeros(n, kind.parts, rank, device=device),
                                     torch.zeros(n, kind.parts, kind.part_out, rank, device=device, dtype=dtype))
    return LaidOutAdapter(name, out)
