"""The model's adapter-carrying linears, and the factors a forward gives them.

`LoraSlots` finds every adaptable linear (`adapter.model_slots`), wraps the dense ones in
`LoraLinear` (`Fp8Weight`s carry adapters themselves), and groups them by kind (`layout`). A forward
whose row (batch item) i has the adapters `rows[i]` gets a `ForwardFactors`:

- groups: the distinct adapter sets of the rows, each row pointing at its own; where some row has
  none, group 0 is the empty set (zeros);
- per kind, the groups' factors stacked `[n_blocks, G, P, R, ...]`, R the largest padded rank; one
  image with one adapter at scale 1 reads the adapter's own tensors (views, nothing copied);
- per slot, views of those for its block, where the update op finds them for the forward
  (`ops.FACTORS`, by the linear's id; `using`).

Every slot carries factors in a forward with adapters (zeros where none applies), so which linears an
adapter targets is no new graph variant: two variants per block shape, without adapters and with.

Where the linears are FP8 (`Fp8Weight`), each keeps its weight as the first rows of a longer buffer
whose last rows, the *tail* (`TAIL_RANK` rows per part), hold the forward's A factors and their
scales: a forward with adapters runs one GEMM over weight and tail, and its last columns are the
down-projection (`ops.fp8_lora_linear`). The tails of a kind are one tensor over its blocks, so a
forward copies its A in with one copy per kind, once per set of factors (`_pack`: each group gets
`TAIL_RANK / G` rows per part; a forward whose groups times rank need more runs the down-projection
as a GEMM of its own).

The static factors that CUDA graphs of forwards with adapters read are `graph_factors.GraphFactors`.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from deployments.denoiser.lora.adapter import LoraAdapter, Slot, model_slots
from deployments.denoiser.lora.layout import (
    FP8_DTYPE,
    RANK_MULTIPLE,
    KindFactors,
    LaidOutAdapter,
    SlotKind,
    lay_out,
    padded_rank,
    slot_kinds,
    zero_adapter,
)
from deployments.denoiser.lora import ops
from deployments.denoiser.lora.linear import LoraCarrier, LoraLinear

# One forward row's adapters with their scales.
RowAdapters = tuple[tuple[LaidOutAdapter, float], ...]
SlotTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a, a_scale, b of one slot
TAIL_RANK = 128  # rows of A per part an FP8 weight's tail holds (`LoraSlots.tail_rank`): one image's adapters up to this rank


@dataclass(frozen=True)
class KindTail:
    """The tails of one kind's FP8 weights over its blocks: `a` `[n, P * tail_rank, in]` FP8, `a_scale`
    `[n, P * tail_rank]` float32 (views of the extended weights, `Fp8Weight.with_tail`)."""

    a: torch.Tensor
    a_scale: torch.Tensor
    parts: int

    def layout(self, groups: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tails as `[n, G, P, rank, in]` and `[n, G, P, rank]`: each group's rows of each part."""
        n, _, d_in = self.a.shape
        used = groups * self.parts * rank
        return (self.a[:, :used].view(n, groups, self.parts, rank, d_in),
                self.a_scale[:, :used].view(n, groups, self.parts, rank))


_SERIALS = itertools.count(1)
_SLOT_IDS = itertools.count(1)


@dataclass
class ForwardFactors:
    """One forward's factors (see the module docstring)."""

    groups: torch.Tensor  # [B] int64, each row's group
    kinds: dict[str, KindFactors]  # stacked over the groups: a [n, G, P, R, in], a_scale [n, G, P, R], b [n, G, P, out, R]
    rank: int  # the largest R of any kind
    serial: int = field(default_factory=lambda: next(_SERIALS))  # these factors, not equal ones made again
    used_ranks: dict[str, torch.Tensor] | None = None  # per kind, on the device: B's used columns (`GraphFactors`)
    _views: dict[str, list[SlotTensors]] | None = None

    def rows(self, indices: Sequence[int]) -> ForwardFactors:
        """These factors for a forward over some of the rows only (the ControlNet's controlled rows)."""
        picked = self.groups[torch.tensor(list(indices), dtype=torch.int64, device=self.groups.device)]
        return ForwardFactors(picked, self.kinds, self.rank)

    @property
    def groups_stacked(self) -> int:
        """G: the adapter sets the factors stack (each kind's `a.shape[1]`)."""
        return next(iter(self.kinds.values())).a.shape[1]

    def slot_views(self) -> dict[str, list[SlotTensors]]:
        """Per kind, each block's `(a, a_scale, b)` (made once)."""
        if self._views is None:
            self._views = {name: [(f.a[block], f.a_scale[block], f.b[block]) for block in range(f.a.shape[0])]
                           for name, f in self.kinds.items()}
        return self._views


class LoraSlots:
    """The adaptable linears of one transformer and the factors of the forward in flight."""

    def __init__(self, transformer: nn.Module, plan_cache: int = 2):
        self.slots: dict[str, Slot] = model_slots(transformer)
        self.kinds: dict[str, SlotKind] = slot_kinds(self.slots)
        self.modules: dict[str, LoraCarrier] = {path: carrier_at(transformer, path) for path in self.slots}
        self.ids: dict[str, int] = {path: next(_SLOT_IDS) for path in self.modules}
        for path, module in self.modules.items():
            module.lora_slot = torch.tensor(self.ids[path])
        families = {module.lora_input for module in self.modules.values()}
        if len(families) != 1:
            raise ValueError(f"the block linears mix input kinds {sorted(families)}; LoRA needs one")
        self.fp8 = families == {"fp8"}
        self.device, self.dtype = transformer.x_pad_token.device, transformer.x_pad_token.dtype
        self.tail_rank = TAIL_RANK if self.fp8 else 0  # rows per part of each FP8 weight's tail
        self.tails: dict[str, KindTail] = self._make_tails() if self.fp8 else {}
        self._tails_hold: int | None = None  # the serial of the factors the tails hold
        self._tail_views: dict[tuple[int, int], dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.active: ForwardFactors | None = None
        self._plans: OrderedDict[tuple, tuple[Sequence[RowAdapters], ForwardFactors]] = OrderedDict()
        self._plan_cache = plan_cache
        self._plans_lock = threading.Lock()  # `forget` comes from the thread that loads adapters (`cache`)
        self._set(None)  # each linear's own `lora_on` from the start: compiled guards see one state between forwards

    def _make_tails(self) -> dict[str, KindTail]:
        """Each FP8 weight moved into one buffer per kind, `[n, out + P * tail_rank, in]`, zero tails."""
        tails = {}
        for name, kind in self.kinds.items():
            out, rows, n = kind.parts * kind.part_out, kind.parts * self.tail_rank, len(kind.blocks)
            weight = torch.zeros(n, out + rows, kind.in_features, dtype=FP8_DTYPE, device=self.device)
            scale = torch.zeros(n, 1, out + rows, dtype=torch.float32, device=self.device)
            for block, path in enumerate(kind.paths):
                self.modules[path].with_tail(weight[block], scale[block])
            tails[name] = KindTail(weight[:, out:], scale[:, 0, out:], kind.parts)
        return tails

    def fitting_rank(self, factors: ForwardFactors) -> int | None:
        """Each group's rows per part in the tails for `factors`, or None where they do not fit."""
        if not self.tails:
            return None
        groups = factors.groups_stacked
        rank = self.tail_rank // groups // RANK_MULTIPLE * RANK_MULTIPLE
        if rank == 0 or any(f.a.shape[3] > rank for f in factors.kinds.values()):
            return None
        return rank

    def _pack(self, factors: ForwardFactors) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """Copies `factors`' A and scales into the tails (once per set of factors) and returns each
        block's views of them (`[G, P, rank, in]`, `[G, P, rank]`); None where they do not fit."""
        rank = self.fitting_rank(factors)
        if rank is None:
            return None
        groups = factors.groups_stacked
        if self._tails_hold != factors.serial:
            for name, given in factors.kinds.items():
                a, a_scale = self.tails[name].layout(groups, rank)
                if given.a.data_ptr() == a.data_ptr():  # the tails themselves (`GraphFactors`)
                    continue
                r = given.a.shape[3]
                a[..., :r, :].copy_(given.a)
                a_scale[..., :r].copy_(given.a_scale)
                a_scale[..., r:].zero_()  # rows past r count for nothing
            self._tails_hold = factors.serial
        views = self._tail_views.get((groups, rank))
        if views is None:
            views = {}
            for name, tail in self.tails.items():
                a, a_scale = tail.layout(groups, rank)
                views[name] = [(a[block], a_scale[block]) for block in range(a.shape[0])]
            self._tail_views[(groups, rank)] = views
        return views

    def lay_out(self, adapter: LoraAdapter) -> LaidOutAdapter:
        """`adapter` on this model's device, in its linears' layout (FP8 A for FP8 rows)."""
        return lay_out(adapter, self.slots, self.kinds, self.device, self.dtype, self.fp8)

    def zero_adapter(self, rank: int) -> LaidOutAdapter:
        return zero_adapter(self.kinds, rank, self.device, self.dtype, self.fp8)

    @staticmethod
    def key(rows: Sequence[RowAdapters]) -> tuple:
        return tuple(tuple((id(adapter), scale) for adapter, scale in row) for row in rows)

    def plan(self, rows: Sequence[RowAdapters]) -> ForwardFactors:
        """The factors of a forward whose row i carries `rows[i]`. The last few are kept, with their
        rows (so the adapters' identities in the key stay theirs): a batch's steps make them once.
        Few, since a batch's plan holds a copy of its adapters' factors."""
        key = self.key(rows)
        with self._plans_lock:
            cached = self._plans.get(key)
            if cached is not None:
                self._plans.move_to_end(key)
                return cached[1]
        plan = self._make_plan(rows, key)
        with self._plans_lock:
            self._plans[key] = (tuple(rows), plan)
            while len(self._plans) > self._plan_cache:
                self._plans.popitem(last=False)
        return plan

    def _make_plan(self, rows: Sequence[RowAdapters], key: tuple) -> ForwardFactors:
        sets: list[RowAdapters] = [()] if not all(rows) else []
        index: dict[tuple, int] = {(): 0} if sets else {}
        for row, row_key in zip(rows, key):
            if row_key not in index:
                index[row_key] = len(sets)
                sets.append(row)
        groups = torch.tensor([index[k] for k in key], dtype=torch.int64, device=self.device)
        kinds = {name: self._stack(kind, sets) for name, kind in self.kinds.items()}
        return ForwardFactors(groups, kinds, max(f.a.shape[3] for f in kinds.values()))

    def _stack(self, kind: SlotKind, sets: Sequence[RowAdapters]) -> KindFactors:
        """The groups' factors of one kind, `[n, G, P, R, ...]`."""
        present = [[(adapter.kinds[kind.key], scale) for adapter, scale in row if kind.key in adapter.kinds]
                   for row in sets]
        if len(present) == 1 and len(present[0]) == 1:  # one image, one adapter: its own tensors
            (factors, scale), = present[0]
            a_scale = factors.a_scale if scale == 1.0 else factors.a_scale * scale
            return KindFactors(factors.a.unsqueeze(1), a_scale.unsqueeze(1), factors.b.unsqueeze(1))
        rank = max([padded_rank(1)] + [sum(f.rank for f, _ in group) for group in present])
        n = len(kind.blocks)
        a = torch.zeros(n, len(sets), kind.parts, rank, kind.in_features, device=self.device,
                        dtype=FP8_DTYPE if self.fp8 else self.dtype)
        a_scale = torch.zeros(n, len(sets), kind.parts, rank, device=self.device)
        b = torch.zeros(n, len(sets), kind.parts, kind.part_out, rank, device=self.device, dtype=self.dtype)
        for g, group in enumerate(present):
            col = 0
            for factors, scale in group:
                r = factors.rank
                a[:, g, :, col : col + r] = factors.a
                a_scale[:, g, :, col : col + r] = factors.a_scale * scale
                b[:, g, :, :, col : col + r] = factors.b
                col += r
        return KindFactors(a, a_scale, b)

    def forget(self) -> None:
        """Drops cached plans (they hold adapters' factors): after an adapter leaves the cache (on the
        thread that loads adapters, while the model thread may be planning a step)."""
        with self._plans_lock:
            self._plans.clear()

    def _set(self, factors: ForwardFactors | None) -> None:
        views = None if factors is None else factors.slot_views()
        tails = None if factors is None else self._pack(factors)
        for kind_name, kind in self.kinds.items():
            for block, path in enumerate(kind.paths):
                module = self.modules[path]
                module.lora_on = views is not None
                if views is None:
                    ops.FACTORS.pop(self.ids[path], None)
                else:
                    used = None if factors.used_ranks is None else factors.used_ranks[kind_name]
                    a, a_scale, b = views[kind_name][block]
                    if tails is not None:
                        a, a_scale = tails[kind_name][block]
                    ops.FACTORS[self.ids[path]] = ops.SlotFactors(a, a_scale, b, factors.groups, tails is not None,
                                                                  used)

    @contextlib.contextmanager
    def applied(self, factors: ForwardFactors | None) -> Iterator[None]:
        """Within the block, the linears carry `factors` (none: the base linears alone)."""
        previous = self.active
        self.active = factors
        self._set(factors)
        try:
            yield
        finally:
            self.active = previous
            self._set(previous)

    def using(self, rows: Sequence[RowAdapters]) -> contextlib.AbstractContextManager:
        """Within the block, a forward's row i gets rows[i]'s adapters; none when no row has any."""
        return self.applied(self.plan(rows) if any(rows) else None)


def carrier_at(model: nn.Module, path: str) -> LoraCarrier:
    """The module at `path` of `model` as an adapter carrier (a dense linear wrapped in `LoraLinear`, once)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    current = parent[int(attr)] if attr.isdigit() else getattr(parent, attr)
    if isinstance(current, LoraCarrier):
        return current
    wrapped = LoraLinear(current)
    if attr.isdigit():
        parent[int(attr)] = wrapped
    else:
        setattr(parent, attr, wrapped)
    return wrapped


def install_lora(transformer: nn.Module) -> LoraSlots:
    """Makes every adaptable linear an adapter carrier (once; again returns the same slots)."""
    existing = getattr(transformer, "_lora_slots", None)
    if existing is None:
        existing = LoraSlots(transformer)
        transformer._lora_slots = existing
    return existing
