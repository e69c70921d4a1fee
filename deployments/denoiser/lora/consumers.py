"""The LoRA up-projection inside the kernels that read a linear's output anyway (the fused FP8 blocks).

A LoRA forward on the fused path runs each FP8 linear as one GEMM over its weight and the forward's
A after it (`ops.fp8_lora_linear`: the output `y`, then `h = x A^T` in its last columns). Adding
`h B^T` to `y` as a step of its own reads and writes all of `y` once more: on an H100 at 4256 rows
that was 119 us for q/k/v, 44 for the output projection, 205 for w1/w3 and 47 for w2 per block, most
of what a LoRA forward cost beyond a plain one (RESULTS.md, 2026-12-07). Every one of those outputs
is read next by one of the block's row kernels, so here that kernel adds the update in registers, a
tile of rows at a time: `tl.dot` of the tile's `h` against the part's B, 16 ranks at a time (B is
read once per tile of rows, not once per row):

- `qkv_norm_rope_quant_lora`: q/k/v's per-head norms, RoPE and FP8 cast (`dit.fp8_attention`) on
  `y + h B^T`, one program per tile of rows and head; v's tensor-wide amax in a first pass over
  the same tiles (the update computed in both);
- `swiglu_quant_lora`: `silu(a) * b` to FP8 rows (`dit.fused_quant`) on `[a | b] + h B^T`, in two
  passes over tiles of rows and columns: the rows' amax (atomics), then the recomputed values cast
  with it; a row of w1/w3's output (20480 values) does not fit one program;
- `gated_residual_lora` (`lora.residual_consumer`): after the output projection and after w2.

Each row takes its own batch item's group of factors (a batch mixes adapters), and only the ranks in
use (`ops.SlotFactors.used_rank`: the CUDA graphs' factors are zero-padded to 128). Where the forward's
A did not fit the tail (`slots.LoraSlots.fitting_rank`), `h` is the down-projection's own GEMM
(`ops._down`) and the same kernels read it. With the bf16 attention, q/k/v keeps the update in its
linear (`ops`).

On a CPU the functions compute the same in float32 (the update, then the plain kernels' references);
the tests run the kernels in Triton's interpreter by calling the ops directly, and compile them for
sm_90 (tests/unit/test_lora_kernels_compile.py).
"""

from __future__ import annotations

import torch

from deployments.denoiser.dit import fp8_attention, fused_quant
from deployments.denoiser.dit.fp8_gemm import fp8_gemm
from deployments.denoiser.dit.fused_quant import register_op, triton
from deployments.denoiser.lora import ops

# Tiles and warps: B is read once per tile of rows (tl.dot needs 16 rows or more). Chosen so that
# ptxas fits each kernel in registers without spilling for sm_90 (tests/unit/test_lora_kernels_compile.py);
# not yet timed on a GPU (benchmarks/bench_lora.py's pair figures).
QKV_ROWS, QKV_WARPS = 32, 16  # a tile: 32 rows of one head, q, k and v
SWIGLU_ROWS, SWIGLU_COLUMNS, SWIGLU_WARPS = 32, 128, 8  # a tile: 32 rows, 128 columns of a and of b


def _h(extended: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor, out_features: int,
       factors: ops.SlotFactors) -> torch.Tensor:
    """The forward's `x A^T` `[rows, G * P * R_a]`: the extended GEMM's last columns (a view, rows
    `out + tail` apart), or the down-projection's own GEMM where A was not in the tail."""
    if factors.in_tail:
        return extended[:, out_features : out_features + factors.a[..., 0].numel()]
    a = factors.a
    return ops._down(x, x_scale, a.reshape(-1, a.shape[-1]), factors.a_scale.reshape(1, -1), extended.dtype)


def updated_rows_reference(extended: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor, out_features: int,
                           slot: torch.Tensor) -> torch.Tensor:
    """`y + h B^T` in float32 `[rows, out]`: what the kernels below compute before their own work."""
    f = ops._factors(slot)
    h = _h(extended, x, x_scale, out_features, f).float()  # bf16, as the kernels read it
    b = f.b if f.used_rank is None else f.b[..., : int(f.used_rank)]
    return ops.update(extended[:, :out_features].float(), None, None, f.a, f.a_scale, b.float(), f.groups, h=h)


def _lora_args(extended: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor, out_features: int,
               slot: torch.Tensor) -> tuple[tuple, dict]:
    """The kernels' LoRA arguments (h with its row stride, B with its strides, each item's group, the
    ranks) and their constants."""
    f = ops._factors(slot)
    h = _h(extended, x, x_scale, out_features, f)
    rows_per_item = extended.shape[0] // f.groups.shape[0]
    used = f.used_rank if f.used_rank is not None else f.groups  # (a pointer either way; unread without)
    args = (h, h.stride(0), f.b, *f.b.stride(), f.groups, rows_per_item, f.a.shape[2], f.b.shape[3], used)
    constants = {"USED_IN_MEMORY": f.used_rank is not None, "DOT_F32": extended.device.type != "cuda"}
    return args, constants


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _update_tile(h_ptr, h_row_stride, b_ptr, b_sg, b_sp, b_sc, b_sr, groups_ptr, rows_per_item, a_rank, rank,
                     used_ptr, parts, part, rows, rows_m, row_ok, cols, col_ok,
                     BM: tl.constexpr, BN: tl.constexpr, USED_IN_MEMORY: tl.constexpr, DOT_F32: tl.constexpr):
        """`h B^T` of one part for a tile `[BM, BN]` (float32): rows `rows_m`, the part's columns `cols`.
        Per batch item in the tile (usually one), its group's h columns against its group's B, 16 ranks
        at a time up to the rank in use (`used_ptr`'s where B is zero-padded past it, else `rank`)."""
        used = rank
        if USED_IN_MEMORY:
            used = tl.load(used_ptr)
        row_start = tl.program_id(0).to(tl.int64) * BM
        first = row_start // rows_per_item
        last = (tl.minimum(row_start + BM, rows) - 1) // rows_per_item
        item_of_row = rows_m // rows_per_item
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for item in range(first, last + 1):
            group = tl.load(groups_ptr + item)
            in_item = row_ok & (item_of_row == item)
            h_row = h_ptr + rows_m[:, None] * h_row_stride + group * (parts * a_rank) + part * a_rank
            b_part = b_ptr + group * b_sg + part * b_sp + cols[None, :] * b_sc
            for r0 in range(0, used, 16):
                r = r0 + tl.arange(0, 16)
                r_ok = r < used
                h = tl.load(h_row + r[None, :], mask=in_item[:, None] & r_ok[None, :], other=0.0)
                bt = tl.load(b_part + r[:, None] * b_sr, mask=r_ok[:, None] & col_ok[None, :], other=0.0)
                if DOT_F32:  # Triton's interpreter (CPU tensors) multiplies bf16 dots wrongly
                    acc += tl.dot(h.to(tl.float32), bt.to(tl.float32))
                else:
                    acc += tl.dot(h, bt.to(h.dtype))
        return acc

    @triton.jit
    def _norm_rope_tile(x, w_ptr, cos, sin, descale, eps, BM: tl.constexpr, HALF: tl.constexpr):
        """One head of a tile of rows, `[BM, 2 * HALF]`: RMS norm, weight, rotation, scaled to FP8's range."""
        rms = tl.rsqrt(tl.sum(x * x, axis=1) / (2 * HALF) + eps)[:, None]
        x = x * rms * tl.load(w_ptr + tl.arange(0, 2 * HALF))[None, :].to(tl.float32)
        even, odd = tl.split(tl.reshape(x, (BM, HALF, 2)))
        rotated = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BM, 2 * HALF))
        return tl.clamp(rotated / descale, -448.0, 448.0)

    @triton.jit
    def _qkv_lora_kernel(qkv_ptr, h_ptr, h_row_stride, b_ptr, b_sg, b_sp, b_sc, b_sr, groups_ptr, rows_per_item,
                         a_rank, rank, used_ptr, wq_ptr, wk_ptr, rope_ptr, qk_descale_ptr, v_amax_ptr, v_descale_ptr,
                         q_ptr, k_ptr, v_ptr, rows, heads, row_stride, eps_q, eps_k,
                         AMAX_ONLY: tl.constexpr, BM: tl.constexpr, HALF: tl.constexpr,
                         USED_IN_MEMORY: tl.constexpr, DOT_F32: tl.constexpr):
        rows_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        head_cols = tl.arange(0, 2 * HALF)
        cols = tl.program_id(1) * (2 * HALF) + head_cols  # within a part
        row_ok = rows_m < rows
        col_ok = cols < heads * 2 * HALF
        ok = row_ok[:, None]
        width = heads * 2 * HALF
        src = qkv_ptr + rows_m[:, None] * row_stride + cols[None, :]
        if AMAX_ONLY:
            v = tl.load(src + 2 * width, mask=ok, other=0.0).to(tl.float32)
            v += _update_tile(h_ptr, h_row_stride, b_ptr, b_sg, b_sp, b_sc, b_sr, groups_ptr, rows_per_item,
                              a_rank, rank, used_ptr, 3, 2, rows, rows_m, row_ok, cols, col_ok, BM, 2 * HALF,
                              USED_IN_MEMORY, DOT_F32)
            tl.atomic_max(v_amax_ptr, tl.max(tl.max(tl.where(ok, tl.abs(v), 0.0), axis=1), axis=0))
        else:
            table = tl.load(rope_ptr + rows_m[:, None] * (2 * HALF) + head_cols[None, :], mask=ok, other=0.0)
            cos, sin = tl.split(tl.reshape(table.to(tl.float32), (BM, HALF, 2)))  # (cos, sin) pairs
            dst = rows_m[:, None] * width + cols[None, :]
            q = tl.load(src, mask=ok, other=0.0).to(tl.float32)
            q += _update_tile(h_ptr, h_row_stride, b_ptr, b_sg, b_sp, b_sc, b_sr, groups_ptr, rows_per_item,
                              a_rank, rank, used_ptr, 3, 0, rows, rows_m, row_ok, cols, col_ok, BM, 2 * HALF,
                              USED_IN_MEMORY, DOT_F32)
            q = _norm_rope_tile(q, wq_ptr, cos, sin, tl.load(qk_descale_ptr), eps_q, BM, HALF)
            tl.store(q_ptr + dst, q.to(q_ptr.dtype.element_ty), mask=ok)
            k = tl.load(src + width, mask=ok, other=0.0).to(tl.float32)
            k += _update_tile(h_ptr, h_row_stride, b_ptr, b_sg, b_sp, b_sc, b_sr, groups_ptr, rows_per_item,
                              a_rank, rank, used_ptr, 3, 1, rows, rows_m, row_ok, cols, col_ok, BM, 2 * HALF,
                              USED_IN_MEMORY, DOT_F32)
            k = _norm_rope_tile(k, wk_ptr, cos, sin, tl.load(qk_descale_ptr + 1), eps_k, BM, HALF)
            tl.store(k_ptr + dst, k.to(k_ptr.dtype.element_ty), mask=ok)
            v = tl.load(src + 2 * width, mask=ok, other=0.0).to(tl.float32)
            v += _update_tile(h_ptr, h_row_stride, b_ptr, b_sg, b_sp, b_sc, b_sr, groups_ptr, rows_per_item,
                              a_rank, rank, used_ptr, 3, 2, rows, rows_m, row_ok, cols, col_ok, BM, 2 * HALF,
                              USED_IN_MEMORY, DOT_F32)
            v_descale = tl.maximum(tl.load(v_amax_ptr), 1e-12) / 448.0
            v = tl.clamp(v / v_descale, -448.0, 448.0)
            tl.store(v_ptr + dst, v.to(v_ptr.dtype.element_ty), mask=ok)
            if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
                tl.store(v_descale_ptr, v_descale)

    @triton.jit
    def _swiglu_lora_kernel(y_ptr, h_ptr, h_row_stride, b_ptr, b_sg, b_sp, b_sc, b_sr, groups_ptr, rows_per_item,
                            a_rank, rank, used_ptr, amax_ptr, q_ptr, s_ptr, rows, n_cols, row_stride,
                            QUANT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            USED_IN_MEMORY: tl.constexpr, DOT_F32: tl.constexpr):
        rows_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        row_ok = rows_m < rows
        col_ok = cols < n_cols
        ok = row_ok[:, None] & col_ok[None, :]
        src = y_ptr + rows_m[:, None] * row_stride + cols[None, :]
        a = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        a += _update_tile(h_ptr, h_row_stride, b_ptr, b_sg, b_sp, b_sc, b_sr, groups_ptr, rows_per_item,
                              a_rank, rank, used_ptr, 2, 0, rows, rows_m, row_ok, cols, col_ok, BM, BN,
                              USED_IN_MEMORY, DOT_F32)
        b = tl.load(src + n_cols, mask=ok, other=0.0).to(tl.float32)
        b += _update_tile(h_ptr, h_row_stride, b_ptr, b_sg, b_sp, b_sc, b_sr, groups_ptr, rows_per_item,
                              a_rank, rank, used_ptr, 2, 1, rows, rows_m, row_ok, cols, col_ok, BM, BN,
                              USED_IN_MEMORY, DOT_F32)
        z = a * tl.sigmoid(a) * b
        if QUANT:
            scale = tl.maximum(tl.load(amax_ptr + rows_m, mask=row_ok, other=1.0), 1e-12) / 448.0
            z = tl.clamp(z / scale[:, None], -448.0, 448.0)
            tl.store(q_ptr + rows_m[:, None] * n_cols + cols[None, :], z.to(q_ptr.dtype.element_ty), mask=ok)
            if tl.program_id(1) == 0:
                tl.store(s_ptr + rows_m, scale, mask=row_ok)
        else:
            tl.atomic_max(amax_ptr + rows_m, tl.max(tl.where(ok, tl.abs(z), 0.0), axis=1), mask=row_ok)

    def _qkv_lora_op(extended: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor, out_features: int,
                     norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor, rope: torch.Tensor,
                     qk_descale: torch.Tensor, heads: int, eps_q: float, eps_k: float, slot: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, width = extended.shape[0], out_features // 3
        lora, constants = _lora_args(extended, x, x_scale, out_features, slot)
        q, k, v = (torch.empty((rows, width), dtype=fused_quant.FP8_DTYPE, device=extended.device) for _ in range(3))
        v_amax = torch.zeros(1, dtype=torch.float32, device=extended.device)
        v_descale = torch.empty(1, dtype=torch.float32, device=extended.device)
        grid = (triton.cdiv(rows, QKV_ROWS), heads)
        for amax_only in (True, False):
            _qkv_lora_kernel[grid](extended, *lora, norm_q_weight, norm_k_weight, rope, qk_descale, v_amax,
                                   v_descale, q, k, v, rows, heads, extended.stride(0), eps_q, eps_k,
                                   AMAX_ONLY=amax_only, BM=QKV_ROWS, HALF=width // heads // 2, **constants,
                                   num_warps=QKV_WARPS)
        return q, k, v, v_descale

    def _qkv_lora_fake(extended, x, x_scale, out_features, norm_q_weight, norm_k_weight, rope, qk_descale, heads,
                       eps_q, eps_k, slot):
        rows, width = extended.shape[0], out_features // 3
        fp8 = tuple(extended.new_empty((rows, width), dtype=fused_quant.FP8_DTYPE) for _ in range(3))
        return (*fp8, extended.new_empty(1, dtype=torch.float32))

    register_op("qkv_norm_rope_quant_lora(Tensor extended, Tensor x, Tensor x_scale, int out_features, "
                "Tensor norm_q_weight, Tensor norm_k_weight, Tensor rope, Tensor qk_descale, int heads, "
                "float eps_q, float eps_k, Tensor slot) -> (Tensor, Tensor, Tensor, Tensor)",
                _qkv_lora_op, _qkv_lora_fake)

    def _swiglu_lora_op(extended: torch.Tensor, x: torch.Tensor, x_scale: torch.Tensor, out_features: int,
                        slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, n_cols = extended.shape[0], out_features // 2
        lora, constants = _lora_args(extended, x, x_scale, out_features, slot)
        q = torch.empty((rows, n_cols), dtype=fused_quant.FP8_DTYPE, device=extended.device)
        s = torch.empty((rows, 1), dtype=torch.float32, device=extended.device)
        amax = torch.zeros(rows, dtype=torch.float32, device=extended.device)
        grid = (triton.cdiv(rows, SWIGLU_ROWS), triton.cdiv(n_cols, SWIGLU_COLUMNS))
        for quant in (False, True):
            _swiglu_lora_kernel[grid](extended, *lora, amax, q, s, rows, n_cols, extended.stride(0),
                                      QUANT=quant, BM=SWIGLU_ROWS, BN=SWIGLU_COLUMNS, **constants,
                                      num_warps=SWIGLU_WARPS)
        return q, s

    def _swiglu_lora_fake(extended, x, x_scale, out_features, slot):
        rows, n_cols = extended.shape[0], out_features // 2
        return (extended.new_empty((rows, n_cols), dtype=fused_quant.FP8_DTYPE),
                extended.new_empty((rows, 1), dtype=torch.float32))

    register_op("swiglu_quant_lora(Tensor extended, Tensor x, Tensor x_scale, int out_features, Tensor slot)"
                " -> (Tensor, Tensor)", _swiglu_lora_op, _swiglu_lora_fake)


def _extended(linear, x: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """The LoRA forward's one GEMM over the weight and its tail: `[rows, out + tail]` bf16."""
    return fp8_gemm(x, x_scale, linear.extended, linear.extended_scale)


def qkv_norm_rope_quant_lora(linear, x: torch.Tensor, x_scale: torch.Tensor, norm_q_weight: torch.Tensor,
                             norm_k_weight: torch.Tensor, rope: torch.Tensor, qk_descale: torch.Tensor, heads: int,
                             eps_q: float, eps_k: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fp8_attention.qkv_norm_rope_quant` of the fused q/k/v linear `linear` (an `Fp8Weight` with this
    forward's adapters) on the FP8 rows `x`: its GEMM, the update and the q/k/v kernel in two launches."""
    extended = _extended(linear, x, x_scale)
    if not fused_quant.triton_available(extended.device):
        qkv = updated_rows_reference(extended, x, x_scale, linear.out_features, linear.lora_slot)
        return fp8_attention.qkv_norm_rope_quant(qkv, norm_q_weight, norm_k_weight, rope, qk_descale, heads,
                                                 eps_q, eps_k)
    return torch.ops.zimage.qkv_norm_rope_quant_lora(extended, x, x_scale, linear.out_features, norm_q_weight,
                                                     norm_k_weight, rope, qk_descale, heads, eps_q, eps_k,
                                                     linear.lora_slot)


def swiglu_quant_lora(linear, x: torch.Tensor, x_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_quant.swiglu_quant` of the fused w1/w3 linear `linear` (an `Fp8Weight` with this forward's
    adapters) on the FP8 rows `x`."""
    extended = _extended(linear, x, x_scale)
    if not fused_quant.triton_available(extended.device):
        return fused_quant.swiglu_quant(updated_rows_reference(extended, x, x_scale, linear.out_features,
                                                               linear.lora_slot))
    return torch.ops.zimage.swiglu_quant_lora(extended, x, x_scale, linear.out_features, linear.lora_slot)

