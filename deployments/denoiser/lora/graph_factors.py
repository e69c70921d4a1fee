"""Static buffers of one image's adapter factors up to a rank, for the CUDA graphs of forwards with
adapters (`dit.step_graphs`): the graph reads them, a replay first copies the forward's factors in
(only when they changed since the last replay). With tails (`slots.LoraSlots.tails`), A and its
scales are the tails themselves, and only B has buffers of its own.
"""

from __future__ import annotations

import torch

from deployments.denoiser.lora.layout import KindFactors, padded_rank
from deployments.denoiser.lora.slots import ForwardFactors, LoraSlots


class GraphFactors:
    """Static factors of one image, up to `rank`, for CUDA graphs of forwards with adapters: what a
    captured graph reads; `fill` copies a forward's factors in (zero-padded) before a replay."""

    def __init__(self, slots: LoraSlots, rank: int):
        self.slots = slots
        self.rank = padded_rank(rank)
        self.in_tails = bool(slots.tails) and self.rank <= slots.tail_rank
        if self.in_tails:  # A and its scales: the tails, laid out for one group; B of its own
            kinds = {name: KindFactors(*slots.tails[name].layout(1, slots.tail_rank),
                                       torch.zeros(len(kind.blocks), 1, kind.parts, kind.part_out, self.rank,
                                                   device=slots.device, dtype=slots.dtype))
                     for name, kind in slots.kinds.items()}
        else:
            zero = slots.zero_adapter(self.rank)
            kinds = {name: KindFactors(f.a.unsqueeze(1), f.a_scale.unsqueeze(1), f.b.unsqueeze(1))
                     for name, f in zero.kinds.items()}
        used = {name: torch.full((1,), self.rank, dtype=torch.int32, device=slots.device) for name in kinds}
        self.factors = ForwardFactors(torch.zeros(1, dtype=torch.int64, device=slots.device), kinds, self.rank,
                                      used_ranks=used)
        self.holds: int | None = None  # the serial of the factors copied in last

    @property
    def nbytes(self) -> int:
        """The static buffers' bytes (with tails, B alone: A lives in the weights' tails)."""
        if self.in_tails:
            return sum(f.b.nbytes for f in self.factors.kinds.values())
        return sum(f.nbytes for f in self.factors.kinds.values())

    def fits(self, factors: ForwardFactors) -> bool:
        return factors.groups.shape[0] == 1 and factors.rank <= self.rank

    def fill(self, factors: ForwardFactors) -> None:
        """Copies `factors` (one image, rank up to `self.rank`) in, unless they are already there."""
        if factors is self.factors:
            return
        if self.in_tails and self.slots._pack(factors) is None:
            raise ValueError(f"factors of rank {factors.rank} do not fit the tails")
        if self.holds == factors.serial:
            return
        for name, static in self.factors.kinds.items():
            given = factors.kinds[name]
            r = given.a.shape[3]
            if not self.in_tails:
                static.a[:, :, :, :r].copy_(given.a)
                static.a_scale[:, :, :, :r].copy_(given.a_scale)
            static.b[..., :r].copy_(given.b)
            self.factors.used_ranks[name].fill_(r)  # the kernels that add the update stop there
            if r < self.rank:
                if not self.in_tails:
                    static.a_scale[:, :, :, r:].zero_()  # A's rows past r count for nothing (scale 0) ...
                static.b[..., r:].zero_()  # ... and B's columns past r neither
        self.holds = factors.serial
