"""Up-projections folded into the base FP8 GEMM, for the linears whose output is much wider than their input.

`ops.update` adds `(x A^T) B^T` to a linear's output in a pass of its own, which reads and writes the
output once more. For q/k/v (output 3x the input) and w1/w3 (5.3x) that pass was most of an adapter's
cost on the GPU (RESULTS.md, rounds of 2026-12-07). Folded, the update rides in the base GEMM as extra
columns of K:

    y = [x | h'] @ [W | B']^T          one cuBLAS FP8 GEMM over K + C columns instead of K

with h = x A^T the down-projection (C = groups x parts x rank columns, `ops._down`), and the extra
columns scaled so that the GEMM's own scales (x's per row, W's per output channel) serve them too:

    B'[n, c] = fp8(B[n, c] * w_c / sw[n]),   w_c = 448 / max_n |B[n, c] / sw[n]|
    h'[m, c] = fp8(h[m, c] / (sx[m] * w_c)), clamped to +-448; 0 where row m's item is not in c's group

(`sx`, `sw`: x's row scales and W's channel scales). B' is known when it is filled, so its largest
value goes to the top of FP8's range, which leaves h' (known only in the forward) all the room there
is. That room is finite: h' B' stands for one term `h B / (sx sw)` of the update against the K terms
of the base sum, and a strong adapter's h' passes 448 (on the full-size DiT with activations of a
few outlier channels, random rank-32 adapters that change the output by 8.5% peaked at h' = 241; by
87%, a third of h' was over; tests/unit/test_lora_fold.py). So no value is lost to the clamp: a
second kernel (`clamp_residual`) reads h, and in the row blocks where some h' was clamped (none, for
adapters of ordinary strength: a read of h and nothing else) adds the clamped-off part of the update
to y, `(h - sx w clamp(h')) B^T`. B' is block-diagonal over the parts (q, k, v;
w1, w3). Each folded kind keeps its blocks' FP8 weights in one tensor `[blocks, out, in + capacity]`:
a block's `Fp8Weight.weight` is a view of its first `in` columns (a forward without adapters runs the
same GEMM on it, with a longer row stride), and the rest holds B' of the factors it was last filled
with (`FoldedKind.fill`: all blocks at once, when a forward's factors differ from the last ones). A
forward whose factors need more than `capacity` columns runs `ops.update` instead; the empty group of
a batch with rows without adapters takes no columns.
"""

from __future__ import annotations

import torch

from deployments.denoiser.lora import ops
from deployments.denoiser.lora.layout import FP8_DTYPE, FP8_MAX

try:  # Triton comes with CUDA builds of torch; CPU builds run the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

FOLD_WIDTH_RATIO = 2  # fold a kind whose output is at least this many times its input
FOLD_RANK = 128  # capacity: one group up to this rank, or several whose ranks add up to it


def folds(in_features: int, out_features: int) -> bool:
    """Whether a linear of these shapes folds: the output's extra read and write that the fold saves
    must outweigh the copy of the FP8 input rows it costs (`fold_rows`)."""
    return out_features >= FOLD_WIDTH_RATIO * in_features


class FoldedKind:
    """The blocks of one slot kind with their weights widened by `capacity` columns (module docstring)."""

    def __init__(self, carriers: list, parts: int, rank: int = FOLD_RANK):
        first = carriers[0]
        self.parts, self.in_features, self.out_features = parts, first.in_features, first.out_features
        self.capacity = parts * rank
        device = first.weight.device
        self.wide = torch.zeros(len(carriers), self.out_features, self.in_features + self.capacity,
                                dtype=FP8_DTYPE, device=device)
        for block, carrier in enumerate(carriers):
            self.wide[block, :, : self.in_features].copy_(carrier.weight)
            carrier.weight = self.wide[block, :, : self.in_features]  # the old buffer goes
        # W's channel scales per block and part: [blocks, parts, out_p]
        self.channel_scale = torch.stack([c.scale.reshape(parts, -1) for c in carriers]).float()
        self.inv_w = torch.ones(len(carriers), self.capacity, device=device)
        self.holds: int | None = None  # the serial of the factors B' was filled from
        self.skip = 0  # 1 where group 0 of those factors is the empty set (rows without adapters): not folded
        self.pending: tuple[torch.Tensor, int, int] | None = None  # (b, serial, skip) of the forward in flight

    @property
    def nbytes(self) -> int:
        return self.wide[..., self.in_features:].numel() + self.inv_w.nbytes

    def fits(self, columns: int) -> bool:
        return columns <= self.capacity

    def ensure(self) -> None:
        """Filled from the forward's factors (`pending`, set by `slots.LoraSlots`), if not already.
        A CUDA-graph capture finds it filled (`slots.LoraSlots.fill_folds`): no fill is recorded."""
        if self.pending is not None:
            self.fill(*self.pending)

    def fill(self, b: torch.Tensor, serial: int, skip: int = 0) -> None:
        """B' and 1/w of every block from `b` `[blocks, G, P, out_p, R]`, groups from `skip` on (unless
        filled from `serial`)."""
        if self.holds == serial:
            return
        b = b[:, skip:]
        blocks, groups, parts, part_out, rank = b.shape
        columns = groups * parts * rank
        sw = self.channel_scale[:, None, :, :, None]  # [blocks, 1, P, out_p, 1]
        ratio = (b.float().abs() / sw).amax(dim=3)  # [blocks, G, P, R]
        w = torch.where(ratio > 0, FP8_MAX / ratio.clamp_min(1e-30), torch.ones_like(ratio))
        bq = (b.float() * (w.unsqueeze(3) / sw)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        cols = self.wide[:, :, self.in_features : self.in_features + columns]
        cols.zero_()
        view = cols.view(blocks, parts, part_out, groups, parts, rank)
        for part in range(parts):
            view[:, part, :, :, part, :] = bq[:, :, part].permute(0, 2, 1, 3)
        self.inv_w[:, :columns] = (1.0 / w).reshape(blocks, columns)
        self.holds, self.skip = serial, skip


# slot id -> (the kind's fold, the block's index in it): the folded linears, filled by `slots.LoraSlots`
FOLDS: dict[int, tuple[FoldedKind, int]] = {}


if triton is not None:

    @triton.jit
    def _fold_rows_kernel(x_ptr, out_bytes_ptr, h_ptr, s_ptr, inv_w_ptr, groups_ptr, out_ptr,
                          n_cols, n_extra, out_cols, rows_per_item, group_cols, skip,
                          BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, BLOCK_K)
        for start in range(0, n_cols, BLOCK_K):
            cols = start + k
            values = tl.load(x_ptr + row * n_cols + cols, mask=cols < n_cols)
            tl.store(out_bytes_ptr + row * out_cols + cols, values, mask=cols < n_cols)
        c = tl.arange(0, BLOCK_C)
        inside = c < n_extra
        group = tl.load(groups_ptr + row // rows_per_item)
        h = tl.load(h_ptr + row * n_extra + c, mask=inside, other=0.0).to(tl.float32)
        inv_w = tl.load(inv_w_ptr + c, mask=inside, other=0.0)
        scaled = tl.clamp(h * inv_w / tl.load(s_ptr + row), -448.0, 448.0)
        scaled = tl.where(c // group_cols + skip == group, scaled, 0.0)
        tl.store(out_ptr + row * out_cols + n_cols + c, scaled.to(out_ptr.dtype.element_ty), mask=inside)


if triton is not None:

    @triton.jit
    def _excess(h_ptr, s, m, row_in, group, c, inv_w_ptr, n_extra, group_cols, skip):
        """What the clamp of h' cut off, back in h's units, for rows `m` and columns `c`."""
        col_in = c < n_extra
        inv_w = tl.load(inv_w_ptr + c, mask=col_in, other=1.0)
        h = tl.load(h_ptr + m[:, None] * n_extra + c[None, :], mask=row_in[:, None] & col_in[None, :],
                    other=0.0).to(tl.float32)
        scaled = h * inv_w[None, :] / s[:, None]
        own = ((c // group_cols + skip)[None, :] == group[:, None]) & col_in[None, :]
        return tl.where(own, (scaled - tl.clamp(scaled, -448.0, 448.0)) * s[:, None] / inv_w[None, :], 0.0)

    @triton.jit
    def _clamp_residual_kernel(y_ptr, h_ptr, s_ptr, inv_w_ptr, groups_ptr, b_ptr,
                               rows, n_out, n_extra, rows_per_item, group_cols, skip, rank, parts, part_out,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = m < rows
        group = tl.load(groups_ptr + m // rows_per_item, mask=row_in, other=-1)
        s = tl.load(s_ptr + m, mask=row_in, other=1.0)
        found = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, n_extra, BLOCK_C):
            excess = _excess(h_ptr, s, m, row_in, group, c0 + tl.arange(0, BLOCK_C), inv_w_ptr, n_extra, group_cols,
                             skip)
            found = tl.maximum(found, tl.max(tl.abs(excess), axis=1))
        if tl.max(found, axis=0) > 0:  # the rare row block with a clamped h': the update's missing part
            n = tl.arange(0, BLOCK_N)
            for n0 in range(0, n_out, BLOCK_N):
                out = n0 + n
                out_in = out < n_out
                add = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for c0 in range(0, n_extra, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    missing = _excess(h_ptr, s, m, row_in, group, c, inv_w_ptr, n_extra, group_cols, skip)
                    local = out[:, None] - ((c // rank) % parts)[None, :] * part_out  # B's row within c's part
                    inside = (local >= 0) & (local < part_out) & (c < n_extra)[None, :] & out_in[:, None]
                    b = tl.load(b_ptr + ((c // rank)[None, :] * part_out + local) * rank + (c % rank)[None, :],
                                mask=inside, other=0.0).to(tl.float32)
                    add += tl.dot(missing, tl.trans(b), input_precision="ieee")
                where = row_in[:, None] & out_in[None, :]
                offsets = m[:, None] * n_out + out[None, :]
                y = tl.load(y_ptr + offsets, mask=where, other=0.0).to(tl.float32)
                tl.store(y_ptr + offsets, (y + add).to(y_ptr.dtype.element_ty), mask=where)


def block_diagonal(b: torch.Tensor) -> torch.Tensor:
    """`b` `[G, P, out_p, R]` as the `[P * out_p, G * P * R]` matrix whose columns the fold adds."""
    groups, parts, part_out, rank = b.shape
    full = b.new_zeros(parts, part_out, groups, parts, rank)
    for part in range(parts):
        full[part, :, :, part] = b[:, part].transpose(0, 1)
    return full.reshape(parts * part_out, groups * parts * rank)


def clamp_residual_reference(y: torch.Tensor, h: torch.Tensor, x_scale: torch.Tensor, inv_w: torch.Tensor,
                             groups: torch.Tensor, b: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """`y` plus what the clamp of h' left out of the update (module docstring), in place, in torch;
    `b` and h's columns are the groups from `skip` on."""
    scaled = h.float() * inv_w / x_scale
    group_cols = b.shape[1] * b.shape[3]
    item_group = groups.repeat_interleave(y.shape[0] // groups.shape[0])
    own = (torch.arange(h.shape[1], device=h.device) // group_cols + skip)[None, :] == item_group[:, None]
    excess = (scaled - scaled.clamp(-FP8_MAX, FP8_MAX)) * own
    if excess.any():
        y += ((excess * x_scale / inv_w) @ block_diagonal(b).float().t()).to(y.dtype)
    return y


def clamp_residual(y: torch.Tensor, h: torch.Tensor, x_scale: torch.Tensor, inv_w: torch.Tensor,
                   groups: torch.Tensor, b: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """`clamp_residual_reference`, on a GPU in Triton (`launch_clamp_residual`)."""
    if triton is None or y.device.type != "cuda":
        return clamp_residual_reference(y, h, x_scale, inv_w, groups, b, skip)
    return launch_clamp_residual(y, h, x_scale, inv_w, groups, b, skip)


def launch_clamp_residual(y: torch.Tensor, h: torch.Tensor, x_scale: torch.Tensor, inv_w: torch.Tensor,
                          groups: torch.Tensor, b: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """The Triton kernel (tests run it on CPU tensors in Triton's interpreter): one read of h in row
    blocks where nothing was clamped."""
    rows, n_out = y.shape
    _, parts, part_out, rank = b.shape
    block_m = 32
    _clamp_residual_kernel[(triton.cdiv(rows, block_m),)](
        y, h, x_scale, inv_w, groups, b.contiguous(), rows, n_out, h.shape[1], rows // groups.shape[0],
        parts * rank, skip, rank, parts, part_out,
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_C=32, num_warps=4,
    )
    return y


def fold_rows_reference(x: torch.Tensor, h: torch.Tensor, x_scale: torch.Tensor, inv_w: torch.Tensor,
                        groups: torch.Tensor, group_cols: int, skip: int = 0) -> torch.Tensor:
    """`[x | h']` `[rows, in + C]` in FP8 (module docstring), in torch."""
    rows = x.shape[0]
    item_group = groups.repeat_interleave(rows // groups.shape[0])
    own = (torch.arange(h.shape[1], device=h.device) // group_cols + skip)[None, :] == item_group[:, None]
    scaled = torch.where(own, (h.float() * inv_w / x_scale).clamp(-FP8_MAX, FP8_MAX), 0.0)
    return torch.cat([x, scaled.to(FP8_DTYPE)], dim=1)


def fold_rows(x: torch.Tensor, h: torch.Tensor, x_scale: torch.Tensor, inv_w: torch.Tensor,
              groups: torch.Tensor, group_cols: int, skip: int = 0) -> torch.Tensor:
    """`fold_rows_reference`, on a GPU in one pass of Triton (`launch_fold_rows`)."""
    if triton is None or x.device.type != "cuda":
        return fold_rows_reference(x, h, x_scale, inv_w, groups, group_cols, skip)
    return launch_fold_rows(x, h, x_scale, inv_w, groups, group_cols, skip)


def launch_fold_rows(x: torch.Tensor, h: torch.Tensor, x_scale: torch.Tensor, inv_w: torch.Tensor,
                     groups: torch.Tensor, group_cols: int, skip: int = 0) -> torch.Tensor:
    """The Triton kernel (tests run it on CPU tensors in Triton's interpreter)."""
    rows, n_cols = x.shape
    n_extra = h.shape[1]
    out = torch.empty(rows, n_cols + n_extra, dtype=FP8_DTYPE, device=x.device)
    _fold_rows_kernel[(rows,)](
        x.view(torch.uint8), out.view(torch.uint8), h.contiguous(), x_scale, inv_w, groups, out,
        n_cols, n_extra, n_cols + n_extra, rows // groups.shape[0], group_cols, skip,
        BLOCK_K=min(4096, triton.next_power_of_2(n_cols)), BLOCK_C=triton.next_power_of_2(n_extra), num_warps=4,
    )
    return out


def folded_linear(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                  slot: int) -> torch.Tensor:
    """The linear's output with the forward's adapters of `slot` (FP8 rows `x` `[rows, in]`)."""
    a, a_scale, b, groups = ops.FACTORS[slot]
    fold, block = FOLDS[slot]
    skip = fold.pending[2] if fold.pending is not None else fold.skip
    n_groups, parts, rank, d_in = a.shape
    columns = (n_groups - skip) * parts * rank
    if not fold.fits(columns):
        return ops.update(_base(x, x_scale, weight, scale), x, x_scale, a, a_scale, b, groups)
    fold.ensure()
    h = ops._down(x, x_scale, a[skip:].reshape(-1, d_in), a_scale[skip:].reshape(1, -1), torch.bfloat16)
    inv_w = fold.inv_w[block, :columns]
    rows = fold_rows(x.contiguous(), h, x_scale, inv_w, groups, parts * rank, skip)
    y = _base(rows, x_scale, fold.wide[block, :, : d_in + columns], scale)
    return clamp_residual(y, h, x_scale, inv_w, groups, b[skip:], skip)


def _base(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cuda":  # the dequantized product, as `Fp8Weight` computes it on a CPU
        return ((x.float() * x_scale) @ (weight.float() * scale.t()).t()).to(torch.bfloat16)
    return torch._scaled_mm(x, weight.t(), scale_a=x_scale, scale_b=scale, out_dtype=torch.bfloat16,
                            use_fast_accum=True)


def _folded_linear_op(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      slot: torch.Tensor) -> torch.Tensor:
    return folded_linear(x, x_scale, weight, scale, int(slot))


def _folded_linear_fake(x, x_scale, weight, scale, slot):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.bfloat16)


ops._LIBRARY.define("lora_folded_linear(Tensor x, Tensor x_scale, Tensor weight, Tensor scale, Tensor slot) -> Tensor")
ops._LIBRARY.impl("lora_folded_linear", _folded_linear_op, "CompositeExplicitAutograd")
torch.library.register_fake("zimage::lora_folded_linear", _folded_linear_fake, lib=ops._LIBRARY)
