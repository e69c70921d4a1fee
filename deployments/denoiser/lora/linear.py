"""Unmerged LoRA beside the base linears: one step batch mixes adapters and scales.

`LoraLinear` wraps a slot's linear (plain, torchao FP8, fused `to_qkv`/`w13`): `y = base(x)`, then for
the batch rows (images) that have adapters on this slot, a grouped low-rank update

    y[rows] += (x[rows] @ A[rows]^T) @ B[rows]^T        A: [n, R, in], B: [n, out, R]

as two batched GEMMs, where row j's `A`/`B` hold its adapters' factors side by side (scale folded
into `A`) and are zero-padded to the batch's largest total rank `R`. Rows without adapters on the
slot are not gathered and pay nothing; a batch without adapters runs the base linear alone.
(Compiled graphs never see one row or rank 1, which they would specialize on: a lone row gets a zero
row beside it, rank is at least 2, and in a forward with adapters a slot none of them targets gets a
zero pair; so two graph variants per block cover every mix: without and with adapters.)

The factors are tensors set on the modules before a forward (`LoraSlots.using`), never constants:
a compiled block reads them as graph inputs, with their row and rank dimensions marked dynamic, so a
new adapter or another mix compiles nothing new.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deployments.denoiser.lora.adapter import LaidOutAdapter, Slot, model_slots

# One forward row's adapters with their scales.
RowAdapters = tuple[tuple[LaidOutAdapter, float], ...]


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.lora_rows: torch.Tensor | None = None
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None

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
        if self.lora_rows is None:
            return y
        return grouped_lora(y, x, self.lora_rows, self.lora_a, self.lora_b)


def grouped_lora(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """`y` plus each selected row's low-rank update (see the module docstring); x and y are [B, S, *]."""
    xs = x.index_select(0, rows).to(a.dtype)
    update = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
    return y.index_add(0, rows, update.to(y.dtype))


@dataclass(frozen=True)
class SlotBatch:
    rows: torch.Tensor  # [n] int64: the batch rows with adapters on this slot
    a: torch.Tensor  # [n, R, in]
    b: torch.Tensor  # [n, out, R]


class LoraSlots:
    """The wrapped linears of one transformer and the per-forward factor batches set on them."""

    def __init__(self, transformer: nn.Module, plan_cache: int = 8):
        self.slots: dict[str, Slot] = model_slots(transformer)
        self.modules: dict[str, LoraLinear] = {}
        for path in self.slots:
            parent_path, _, attr = path.rpartition(".")
            parent = transformer.get_submodule(parent_path)
            current = parent[int(attr)] if attr.isdigit() else getattr(parent, attr)
            if not isinstance(current, LoraLinear):
                current = LoraLinear(current)
                if attr.isdigit():
                    parent[int(attr)] = current
                else:
                    setattr(parent, attr, current)
            self.modules[path] = current
        device, dtype = transformer.x_pad_token.device, transformer.x_pad_token.dtype
        self.device, self.dtype = device, dtype
        # key -> (the rows, kept so that the adapters' ids in the key stay theirs; the plan)
        self._plans: OrderedDict[tuple, tuple[Sequence[RowAdapters], dict[str, SlotBatch]]] = OrderedDict()
        self._plan_cache = plan_cache

    @staticmethod
    def key(rows: Sequence[RowAdapters]) -> tuple:
        return tuple(tuple((id(adapter), scale) for adapter, scale in row) for row in rows)

    def plan(self, rows: Sequence[RowAdapters]) -> dict[str, SlotBatch]:
        """The factor batch of every slot some row adapts, for a forward whose row i carries rows[i]."""
        key = self.key(rows)
        cached = self._plans.get(key)
        if cached is not None:
            self._plans.move_to_end(key)
            return cached[1]
        plan: dict[str, SlotBatch] = {}
        for path in self.slots:
            selected = []
            for index, row in enumerate(rows):
                factors = [(adapter.slots[path], scale) for adapter, scale in row if path in adapter.slots]
                if factors:
                    selected.append((index, factors))
            plan[path] = self._slot_batch(selected) if selected else self._idle(path)
        self._plans[key] = (tuple(rows), plan)
        while len(self._plans) > self._plan_cache:
            self._plans.popitem(last=False)
        return plan

    def _idle(self, path: str) -> SlotBatch:
        """Zero factors for a slot no row adapts in a forward that has adapters elsewhere: every slot of
        such a forward carries factors, so which slots an adapter targets is no new graph variant."""
        slot = self.slots[path]
        out = sum(part.out_features for part in slot.parts)
        a = torch.zeros(2, 2, slot.in_features, device=self.device, dtype=self.dtype)
        b = torch.zeros(2, out, 2, device=self.device, dtype=self.dtype)
        return SlotBatch(torch.zeros(2, dtype=torch.int64, device=self.device), a, b)

    def _slot_batch(self, selected) -> SlotBatch:
        a_rows, b_rows = [], []
        for _, factors in selected:
            a_rows.append(torch.cat([a * scale for (a, _), scale in factors]))
            b_rows.append(torch.cat([b for (_, b), _ in factors], dim=1))
        indices = [index for index, _ in selected]
        if len(selected) == 1:  # a zero row beside it: the compiled graphs never see one row (no 0/1 specialization)
            a_rows.append(torch.zeros_like(a_rows[0]))
            b_rows.append(torch.zeros_like(b_rows[0]))
            indices.append(indices[0])
        rank = max(2, *(a.shape[0] for a in a_rows))  # never a rank of 1 either
        a = torch.stack([F.pad(a, (0, 0, 0, rank - a.shape[0])) for a in a_rows])
        b = torch.stack([F.pad(b, (0, rank - b.shape[1])) for b in b_rows])
        rows = torch.tensor(indices, dtype=torch.int64, device=a.device)
        return SlotBatch(rows, a, b)

    def forget(self) -> None:
        """Drops cached plans (they hold adapters' factors): after an adapter leaves the cache."""
        self._plans.clear()

    def _set(self, plan: dict[str, SlotBatch] | None) -> None:
        for path, module in self.modules.items():
            batch = plan.get(path) if plan else None
            if batch is None:
                module.lora_rows = module.lora_a = module.lora_b = None
                continue
            for tensor, dims in ((batch.rows, [0]), (batch.a, [0, 1]), (batch.b, [0, 2])):
                torch._dynamo.maybe_mark_dynamic(tensor, dims)
            module.lora_rows, module.lora_a, module.lora_b = batch.rows, batch.a, batch.b

    @contextlib.contextmanager
    def using(self, rows: Sequence[RowAdapters]) -> Iterator[None]:
        """Within the block, a forward's row i gets rows[i]'s adapters; none when no row has any."""
        plan = self.plan(rows) if any(rows) else None
        self._set(plan)
        try:
            yield
        finally:
            self._set(None)


def install_lora(transformer: nn.Module) -> LoraSlots:
    """Wraps every adaptable linear (once; again returns the same wrappers)."""
    existing = getattr(transformer, "_lora_slots", None)
    if existing is None:
        existing = LoraSlots(transformer)
        transformer._lora_slots = existing
    return existing
