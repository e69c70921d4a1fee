"""The unmerged LoRA update as one op: `y += (x A^T) B^T`, each batch item with its own factors.

`torch.ops.zimage.lora_add_(y, x, x_scale, a, a_scale, b, groups)` adds, in place, to the output `y`
(`[rows, out]` or `[B, S, out]`) of a linear whose input was `x`, the update of the adapters of each
batch item (`groups[i]`: item i's group; the B items' rows are consecutive, S = rows / B):

    a        [G, P, R, in]      the groups' A of each part (`layout`), FP8 or dense
    a_scale  [G, P, R]          float32, per rank row: A's FP8 scale times the adapter's scale
    b        [G, P, out_p, R]   the groups' B, the output split into P parts of out_p

- down-projection: one GEMM for every group, `h = x @ A^T * a_scale` (`[rows, G*P*R]`). With `x_scale`
  given, `x` is the FP8 rows (and their `[rows, 1]` scales) the fused block quantized for its own
  GEMM, and on a GPU this is an FP8 GEMM on them: no other read of the activations;
- each item keeps its group's columns of h (a gather; none with one group);
- up-projection: per part, a batched GEMM over the items accumulating into y in place (cuBLAS reads
  and writes y once, in its epilogue: `baddbmm_` on y's own strided view, no copy of y).

One op for both kernel families (`x` FP8 or dense), so torch.compile sees one opaque call per linear
with adapters: inductor neither re-fuses nor specializes it, and its fake is shape-only. The group
count, the rank and the batch are dynamic (`slots.LoraSlots` marks them); a batch of one image has one
group, a batch of several always has at least two (the zero group first), so no graph specializes
on a group count of 1 where it could be more.
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
    # the FP8 GEMM's function on a CPU (Fp8Weight does the same for the base GEMM)
    return ((x2d.float() * x_scale) @ a2d.float().t() * a_scale).to(dtype)


def lora_add(y: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor | None, a: torch.Tensor,
             a_scale: torch.Tensor, b: torch.Tensor, groups: torch.Tensor) -> None:
    """The op's eager body (see the module docstring)."""
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
    h = h.view(batch, seq, parts, rank)
    y4 = y.view(batch, seq, parts, part_out)
    for part in range(parts):
        update = b[:, part].transpose(1, 2)  # [items, R, out_p]
        if update.shape[0] != batch:
            update = update.expand(batch, -1, -1)
        y4[:, :, part].baddbmm_(h[:, :, part], update)


def _lora_add_fake(y, x, x_scale, a, a_scale, b, groups) -> None:
    return None


_LIBRARY.define("lora_add_(Tensor(a!) y, Tensor x, Tensor? x_scale, Tensor a, Tensor a_scale, Tensor b, "
                "Tensor groups) -> ()")
_LIBRARY.impl("lora_add_", lora_add, "CompositeExplicitAutograd")
torch.library.register_fake("zimage::lora_add_", _lora_add_fake, lib=_LIBRARY)


def add_lora(y: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor | None, a: torch.Tensor,
             a_scale: torch.Tensor, b: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """`y` with the update added (in place); what the adapter-carrying linears call."""
    torch.ops.zimage.lora_add_(y, x, x_scale, a, a_scale, b, groups)
    return y
