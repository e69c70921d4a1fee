"""The unmerged LoRA update as one op: `y += (x A^T) B^T`, each batch item with its own factors.

`update(y, x, x_scale, a, a_scale, b, groups)` adds, in place, to the output `y` (`[rows, out]` or
`[B, S, out]`) of a linear whose input was `x`, the update of the adapters of each batch item
(`groups[i]`: item i's group; the B items' rows are consecutive, S = rows / B):

    a        [G, P, R, in]      the groups' A of each part (`layout`), FP8 or dense
    a_scale  [G, P, R]          float32, per rank row: A's FP8 scale times the adapter's scale
    b        [G, P, out_p, R]   the groups' B, the output split into P parts of out_p

- down-projection: one GEMM for every group, `h = x @ A^T * a_scale` (`[rows, G*P*R]`). With `x_scale`
  given, `x` is the FP8 rows (and their `[rows, 1]` scales) the fused block quantized for its own
  GEMM. There the down-projection is no GEMM of its own at all: `fp8_lora_linear` runs the linear's
  FP8 GEMM on its weight with the forward's A rows after it (`slots.LoraSlots` keeps each FP8
  weight with room for them, the *tail*), so h is the last columns of that one GEMM's output. On an
  H100 at 4256 rows the tail's columns cost the GEMM 0-8 us, where a GEMM of its own for h took 33-52 us
  (and two Triton kernels were slower still): b1 with one adapter went from 1.21x to 1.17x a plain
  step (RESULTS.md, 2026-12-07). Where a forward's A do not fit the tail (more groups times rank than
  it holds), h is cuBLAS's FP8 GEMM on the same rows (`torch._scaled_mm`);
- each item keeps its group's columns of h (a gather; none with one group);
- up-projection: per part, a batched GEMM over the items accumulating into y in place (cuBLAS reads
  and writes y once, in its epilogue: `baddbmm_` on y's own strided view, no copy of y); one item's
  parts (q/k/v, w1/w3) go in one batched call, the parts being the batch.

The compiled blocks call it as `torch.ops.zimage.lora_add_(y, x, x_scale, slot)` after a dense linear
and as `torch.ops.zimage.fp8_lora_linear(x, x_scale, weight, scale, out, slot)` in place of an FP8
one: `slot` is the linear's id (a CPU scalar tensor, the same shape in every block) and the op finds
the forward's factors for it in `FACTORS`, which `slots.LoraSlots` fills for each forward. So the
factors are no input of the compiled graph at all: no adapter, rank, group count, batch or block
(whose factors are views at other offsets of one tensor) is anything dynamo guards on, and a new one
compiles nothing. One update for both kernel families (`x` FP8 or dense); opaque to inductor, which
reinplaces `lora_add_` on y (no copy of y).
Under a CUDA-graph capture its body runs once, on the static factors the capture set
(`graph_factors.GraphFactors`), and the graph replays those kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from deployments.denoiser.dit.fp8_gemm import fp8_gemm

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


class SlotFactors(NamedTuple):
    """One linear's factors for the forward in flight (see the module docstring for the shapes)."""

    a: torch.Tensor
    a_scale: torch.Tensor
    b: torch.Tensor
    groups: torch.Tensor  # [B] int64: each batch item's group
    in_tail: bool  # `a` is the view of the linear's weight tail that holds them (`fp8_lora_linear`)
    # `[1]` int32 on the device: the rank B's columns use, where they are zero-padded further (the CUDA
    # graphs' static factors, `graph_factors.GraphFactors`); the kernels that add the update skip the rest
    used_rank: torch.Tensor | None = None


# slot id -> its factors for the forward in flight, for each linear that has any
FACTORS: dict[int, SlotFactors] = {}


def update(y: torch.Tensor, x: torch.Tensor | None, x_scale: torch.Tensor | None, a: torch.Tensor,
           a_scale: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """`y` plus each item's update, in place (see the module docstring); returns `y`.

    `h` given: the down-projection made already (`[rows, G*P*R_a]`, the tail's columns of the extended
    GEMM), and `a` only says its layout; B's rank may be below A's (`R_a`): h's columns past it are
    never read."""
    batch = groups.shape[0]
    n_groups, parts, a_rank, d_in = a.shape
    part_out, rank = b.shape[2], b.shape[3]
    rows = y.numel() // y.shape[-1]
    seq = rows // batch
    if h is None:
        h = _down(x.reshape(rows, d_in), x_scale, a.reshape(-1, d_in), a_scale.reshape(1, -1), y.dtype)
    if n_groups > 1:
        h = h.view(batch, seq, n_groups, parts * a_rank)
        h = h.gather(2, groups.view(batch, 1, 1, 1).expand(batch, seq, 1, parts * a_rank))
        b = b.index_select(0, groups)
    if batch == 1 and parts > 1:  # one GEMM per part in one batched call: the parts are the batch
        y_parts = y.view(seq, parts, part_out).transpose(0, 1)  # [P, S, out_p], rows N apart: y's own memory
        y_parts.baddbmm_(h.view(seq, parts, a_rank)[..., :rank].transpose(0, 1), b[0].transpose(1, 2))
        return y
    h = h.view(batch, seq, parts, a_rank)[..., :rank]
    y4 = y.view(batch, seq, parts, part_out)
    for part in range(parts):
        step = b[:, part].transpose(1, 2)  # [items, R, out_p]
        if step.shape[0] != batch:
            step = step.expand(batch, -1, -1)
        y4[:, :, part].baddbmm_(h[:, :, part], step)
    return y


def _factors(slot: torch.Tensor) -> SlotFactors:
    factors = FACTORS.get(int(slot))
    if factors is None:
        raise RuntimeError(f"LoRA slot {int(slot)} has no factors for this forward")
    return factors


def _lora_add(y: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor | None, slot: torch.Tensor) -> None:
    f = _factors(slot)
    update(y, x, x_scale, f.a, f.a_scale, f.b, f.groups)


def _fp8_lora_linear(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     out_features: int, slot: torch.Tensor) -> torch.Tensor:
    f = _factors(slot)
    extended = fp8_gemm(x, x_scale, weight, scale)  # [rows, out + tail]: the base output, then x A^T
    y = extended[:, :out_features]
    if f.in_tail:
        h = extended[:, out_features : out_features + f.a[..., 0].numel()]
        update(y, None, None, f.a, f.a_scale, f.b, f.groups, h=h)
    else:
        update(y, x, x_scale, f.a, f.a_scale, f.b, f.groups)
    return y


def _fp8_lora_linear_fake(x, x_scale, weight, scale, out_features, slot):
    # the real output is a view of the extended GEMM's: its rows are the weight's row count apart
    return x.new_empty_strided((x.shape[0], out_features), (weight.shape[0], 1), dtype=torch.bfloat16)


def _lora_add_fake(y, x, x_scale, slot) -> None:
    return None


_LIBRARY.define("lora_add_(Tensor(a!) y, Tensor x, Tensor? x_scale, Tensor slot) -> ()")
_LIBRARY.impl("lora_add_", _lora_add, "CompositeExplicitAutograd")
torch.library.register_fake("zimage::lora_add_", _lora_add_fake, lib=_LIBRARY)
_LIBRARY.define("fp8_lora_linear(Tensor x, Tensor x_scale, Tensor weight, Tensor scale, int out_features, "
                "Tensor slot) -> Tensor")
_LIBRARY.impl("fp8_lora_linear", _fp8_lora_linear, "CompositeExplicitAutograd")
torch.library.register_fake("zimage::fp8_lora_linear", _fp8_lora_linear_fake, lib=_LIBRARY)


def add_lora(y: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor | None, slot: torch.Tensor) -> torch.Tensor:
    """`y` with the update of linear `slot`'s factors added (in place); what the carriers call."""
    torch.ops.zimage.lora_add_(y, x, x_scale, slot)
    return y


def fp8_lora_linear(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    out_features: int, slot: torch.Tensor) -> torch.Tensor:
    """An FP8 linear with the forward's adapters of `slot`: `weight` `[out + tail, in]` (and `scale`
    `[1, out + tail]`) is the linear's own `out_features` rows, then its tail (see the module
    docstring). Returns `[rows, out_features]` bf16 whose rows are `out + tail` apart (a view of the
    one GEMM's output: the next kernels read it in place)."""
    return torch.ops.zimage.fp8_lora_linear(x, x_scale, weight, scale, out_features, slot)
