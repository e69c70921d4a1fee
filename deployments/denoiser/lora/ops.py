"""The unmerged LoRA update as one op: `y += (x A^T) B^T`, each batch item with its own factors.

`update(y, x, x_scale, a, a_scale, b, groups)` adds, in place, to the output `y` (`[rows, out]` or
`[B, S, out]`) of a linear whose input was `x`, the update of the adapters of each batch item
(`groups[i]`: item i's group; the B items' rows are consecutive, S = rows / B):

    a        [G, P, R, in]      the groups' A of each part (`layout`), FP8 or dense
    a_scale  [G, P, R]          float32, per rank row: A's FP8 scale times the adapter's scale
    b        [G, P, out_p, R]   the groups' B, the output split into P parts of out_p

- down-projection: one GEMM for every group, `h = x @ A^T * a_scale` (`[rows, G*P*R]`). With `x_scale`
  given, `x` is the FP8 rows (and their `[rows, 1]` scales) the fused block quantized for its own
  GEMM, and on a GPU this is cuBLAS's FP8 GEMM on them (`torch._scaled_mm`): no other read of the
  activations. Two Triton kernels shaped for the skinny output (one pass, then K split in slices)
  were each slower than cuBLAS on the GPU (RESULTS.md, rounds of 2026-12-07), so cuBLAS it is;
- each item keeps its group's columns of h (a gather; none with one group);
- up-projection: per part, a batched GEMM over the items accumulating into y in place (cuBLAS reads
  and writes y once, in its epilogue: `baddbmm_` on y's own strided view, no copy of y); one item's
  parts (q/k/v, w1/w3) go in one batched call, the parts being the batch.

The compiled blocks call it as `torch.ops.zimage.lora_add_(y, x, x_scale, slot)`: `slot` is the
linear's id (a CPU scalar tensor, the same shape in every block) and the op finds the forward's factors
for it in `FACTORS`, which `slots.LoraSlots` fills for each forward. So the factors are no input of the
compiled graph at all: no adapter, rank, group count, batch or block (whose factors are views at
other offsets of one tensor) is anything dynamo guards on, and a new one compiles nothing. One op for
both kernel families (`x` FP8 or dense); opaque to inductor, which reinplaces it on y (no copy of y).
Under a CUDA-graph capture its body runs once, on the static factors the capture set
(`slots.GraphFactors`), and the graph replays those kernels.
"""

from __future__ import annotations

import torch

_LIBRARY = torch.library.Library("zimage", "FRAGMENT")


def _down(x2d: torch.Tensor, x_scale: torch.Tensor | None, a2d: torch.Tensor, a_scale: torch.Tensor,
          dtype: torch.dtype) -> torch.Tensor:
    """`x @ A^T * a_scale`, `[rows, N]` in `dtype`."""
    if x_scale is None:
        h = torch.mm(x2d, a2d.t().to(x2d.dtype))
        return h.mul_(a_scale.to(h.dtype)).to(dtype)
    if x2d.device.type == "cuda":
        return torch._scaled_mm(x2d, a2d.t(), scale_a=x_scale, scale_b=a_scale.contiguous(), out_dtype=dtype,
                                use_fast_accum=True)
    return ((x2d.float() * x_scale) @ a2d.float().t() * a_scale).to(dtype)  # the same function on a CPU


# slot id -> (a, a_scale, b, groups): the factors of the forward in flight, for each linear that has any
FACTORS: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def update(y: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor | None, a: torch.Tensor,
           a_scale: torch.Tensor, b: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """`y` plus each item's update, in place (see the module docstring); returns `y`."""
    batch = groups.shape[0]
    n_groups, parts, rank, d_in = a.shape
    part_out = b.shape[2]
    rows = y.numel() // y.shape[-1]
    seq = rows // batch
    h = _down(x.reshape(rows, d_in), x_scale, a.reshape(-1, d_in), a_scale.reshape(1, -1), y.dtype)
    if n_groups > 1:
        h = h.view(batch, seq, n_groups, parts * rank)
        h = h.gather(2, groups.view(batch, 1, 1, 1).expand(batch, seq, 1, parts * rank))
        b = b.index_select(0, groups)
    if batch == 1 and parts > 1:  # one GEMM per part in one batched call: the parts are the batch
        y_parts = y.view(seq, parts, part_out).transpose(0, 1)  # [P, S, out_p], rows N apart: y's own memory
        y_parts.baddbmm_(h.view(seq, parts, rank).transpose(0, 1), b[0].transpose(1, 2))
        return y
    h = h.view(batch, seq, parts, rank)
    y4 = y.view(batch, seq, parts, part_out)
    for part in range(parts):
        step = b[:, part].transpose(1, 2)  # [items, R, out_p]
        if step.shape[0] != batch:
            step = step.expand(batch, -1, -1)
        y4[:, :, part].baddbmm_(h[:, :, part], step)
    return y


def _lora_add(y: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor | None, slot: torch.Tensor) -> None:
    factors = FACTORS.get(int(slot))
    if factors is None:
        raise RuntimeError(f"LoRA slot {int(slot)} has no factors for this forward")
    update(y, x, x_scale, *factors)


def _lora_add_fake(y, x, x_scale, slot) -> None:
    return None


_LIBRARY.define("lora_add_(Tensor(a!) y, Tensor x, Tensor? x_scale, Tensor slot) -> ()")
_LIBRARY.impl("lora_add_", _lora_add, "CompositeExplicitAutograd")
torch.library.register_fake("zimage::lora_add_", _lora_add_fake, lib=_LIBRARY)


def add_lora(y: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor | None, slot: torch.Tensor) -> torch.Tensor:
    """`y` with the update of linear `slot`'s factors added (in place); what the carriers call."""
    torch.ops.zimage.lora_add_(y, x, x_scale, slot)
    return y
