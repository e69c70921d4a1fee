"""The w1/w3 update folded into the SwiGLU's quantization: one kernel instead of an in-place
up-projection over the w13 output followed by `swiglu_quant`.

With adapters, the fused FP8 block's feed-forward today runs the w13 GEMM, the update (`ops.update`:
down-projection, then cuBLAS accumulating `h B^T` into the `[rows, 2 x 10240]` output, one more read
and write of it: 170 us of a 1024x1024 block on an H100, RESULTS.md) and `swiglu_quant`, which reads
the output again. Here the up-projection happens where that output is read anyway:

    a = y1 + h1 B1^T,  b = y3 + h3 B3^T,  g = silu(a) * b  ->  FP8 rows of g and their scales

A program takes `BLOCK_M` rows of one batch item (so one item's B) and walks the row in blocks of
`BLOCK_N` columns twice: once for each row's absolute maximum, once to quantize and write. The rows
are read twice and never written back; B's blocks come from L2.

Not yet called by the block: bench_lora times it against the path it would replace (`kernels`,
`w13_folded_*`), and the block switches to it where it pays. `swiglu_lora_quant_reference` is the
same function in float32.
"""

from __future__ import annotations

import torch

from deployments.denoiser.dit.fused_quant import FP8_DTYPE, swiglu_quant_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_M = 32
BLOCK_N = 128

if triton is not None:

    @triton.jit
    def _gate(y_ptr, h1, h3, b1_ptr, b3_ptr, rows, row_ok, cols, n_cols, rank,
              RANK: tl.constexpr, BLOCK_N: tl.constexpr):
        col_ok = cols < n_cols
        ok = row_ok[:, None] & col_ok[None, :]
        base = y_ptr + rows[:, None].to(tl.int64) * 2 * n_cols + cols[None, :]
        y1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
        y3 = tl.load(base + n_cols, mask=ok, other=0.0).to(tl.float32)
        ranks = tl.arange(0, RANK)
        b_ok = (ranks[:, None] < rank) & col_ok[None, :]
        b_offsets = cols[None, :].to(tl.int64) * rank + ranks[:, None]  # B^T's block [RANK, BLOCK_N]
        b1 = tl.load(b1_ptr + b_offsets, mask=b_ok, other=0.0)
        b3 = tl.load(b3_ptr + b_offsets, mask=b_ok, other=0.0)
        a = y1 + tl.dot(h1, b1)
        b = y3 + tl.dot(h3, b3)
        return a * tl.sigmoid(a) * b, ok

    @triton.jit
    def _swiglu_lora_quant_kernel(y_ptr, h_ptr, b_ptr, q_ptr, s_ptr, rows_per_item, n_cols, rank,
                                  RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        block, item = tl.program_id(0), tl.program_id(1)
        local = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = local < rows_per_item
        rows = item.to(tl.int64) * rows_per_item + local
        ranks = tl.arange(0, RANK)
        h_ok = row_ok[:, None] & (ranks[None, :] < rank)
        h_row = h_ptr + rows[:, None] * 2 * rank + ranks[None, :]  # h: [rows, 2 parts x rank]
        h1 = tl.load(h_row, mask=h_ok, other=0.0)
        h3 = tl.load(h_row + rank, mask=h_ok, other=0.0)
        b1_ptr = b_ptr + item.to(tl.int64) * 2 * n_cols * rank  # b: [items, 2 parts, n_cols, rank]
        b3_ptr = b1_ptr + n_cols * rank
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, n_cols, BLOCK_N):
            g, ok = _gate(y_ptr, h1, h3, b1_ptr, b3_ptr, rows, row_ok, c0 + tl.arange(0, BLOCK_N), n_cols, rank,
                          RANK, BLOCK_N)
            amax = tl.maximum(amax, tl.max(tl.where(ok, tl.abs(g), 0.0), axis=1))
        scale = tl.maximum(amax, 1e-12) / 448.0
        for c0 in range(0, n_cols, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            g, ok = _gate(y_ptr, h1, h3, b1_ptr, b3_ptr, rows, row_ok, cols, n_cols, rank, RANK, BLOCK_N)
            quant = tl.clamp(g / scale[:, None], -448.0, 448.0)
            tl.store(q_ptr + rows[:, None] * n_cols + cols[None, :], quant.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(s_ptr + rows, scale, mask=row_ok)


def swiglu_lora_quant(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, q_dtype: torch.dtype = FP8_DTYPE
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`y` `[rows, 2n]` (the w13 output), `h` `[rows, 2r]` (each row's down-projection, w1's r then
    w3's), `b` `[items, 2, n, r]` (each item's B; rows split evenly over the items) -> the rows of
    `silu(y1 + h1 B1^T) * (y3 + h3 B3^T)` in `q_dtype` (FP8; float32 for interpreter tests) and their
    `[rows, 1]` scales. Triton, on CUDA or in its interpreter."""
    rows, width = y.shape
    items, parts, n_cols, rank = b.shape
    if parts != 2 or width != 2 * n_cols or h.shape != (rows, 2 * rank) or rows % items:
        raise ValueError(f"shapes do not fit: y {tuple(y.shape)}, h {tuple(h.shape)}, b {tuple(b.shape)}")
    q = torch.empty((rows, n_cols), dtype=q_dtype, device=y.device)
    s = torch.empty((rows, 1), dtype=torch.float32, device=y.device)
    rows_per_item = rows // items
    grid = (triton.cdiv(rows_per_item, BLOCK_M), items)
    _swiglu_lora_quant_kernel[grid](y.contiguous(), h.contiguous(), b.contiguous(), q, s, rows_per_item, n_cols, rank,
                                    RANK=max(16, triton.next_power_of_2(rank)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                    num_warps=8)
    return q, s


def swiglu_lora_quant_reference(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function in float32, eagerly: the update added, then `swiglu_quant`'s reference."""
    rows = y.shape[0]
    items, _, n_cols, rank = b.shape
    h3 = h.float().view(items, rows // items, 2, rank)
    update = torch.einsum("ispr,ipnr->ispn", h3, b.float()).reshape(rows, 2 * n_cols)
    return swiglu_quant_reference(y.float() + update)
