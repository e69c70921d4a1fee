"""The LoRA update inside the gated residual kernel, after the output projection and after w2 (see
`lora.consumers` for why and for the update's tile, `_update_tile`).

`gated_residual_lora`: `x + gate * RMSNorm(y + h B^T) * w` and the next norm's FP8 rows
(`fused_quant.gated_residual`). A program owns a tile of whole rows and passes over their columns
(the norm of the row first, then the new rows, then the next norm's amax and its FP8 values),
computing the update again rather than storing it.
"""

from __future__ import annotations

import torch

from deployments.denoiser.dit import fused_quant
from deployments.denoiser.dit.fused_quant import register_op, triton
from deployments.denoiser.lora.consumers import _extended, _lora_args, updated_rows_reference

# a program: 16 whole rows, 128 columns at a time (no spill for sm_90: tests/unit/test_lora_kernels_compile.py)
RESIDUAL_ROWS, RESIDUAL_COLUMNS, RESIDUAL_WARPS = 16, 128, 8

if triton is not None:
    import triton.language as tl

    from deployments.denoiser.lora.consumers import _update_tile

    @triton.jit
    def _gated_residual_lora_kernel(x_ptr, y_ptr, h_ptr, h_row_stride, b_ptr, b_sg, b_sp, b_sc, b_sr, groups_ptr,
                                    rows_per_item, a_rank, rank, used_ptr, w_ptr, gate_ptr, out_ptr, next_w_ptr,
                                    next_mod_ptr, q_ptr, s_ptr, rows, n_cols, y_row_stride, mod_rows_per_item, eps,
                                    next_eps, HAS_GATE: tl.constexpr, NEXT: tl.constexpr,
                                    NEXT_HAS_MOD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                    USED_IN_MEMORY: tl.constexpr, DOT_F32: tl.constexpr):
        """`fused_quant._gated_residual_kernel` on `y + h B^T`, for a tile of whole rows: passes over
        the row's columns (the row norms need the whole row first), each computing the update again
        (a few FLOPs) rather than storing it; the new x is re-read for the next norm (from L2)."""
        rows_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        row_ok = rows_m < rows
        item = rows_m // mod_rows_per_item
        squares = tl.zeros((BM,), dtype=tl.float32)
        for c0 in range(0, n_cols, BN):
            cols = c0 + tl.arange(0, BN)
            col_ok = cols < n_cols
            y = tl.load(y_ptr + rows_m[:, None] * y_row_stride + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            y += _update_tile(h_ptr, h_row_stride, b_ptr, b_sg, b_sp, b_sc, b_sr, groups_ptr, rows_per_item,
                              a_rank, rank, used_ptr, 1, 0, rows, rows_m, row_ok, cols, col_ok, BM, BN,
                              USED_IN_MEMORY, DOT_F32)
            squares += tl.sum(y * y, axis=1)
        rms = tl.rsqrt(squares / n_cols + eps)[:, None]
        next_squares = tl.zeros((BM,), dtype=tl.float32)
        for c0 in range(0, n_cols, BN):
            cols = c0 + tl.arange(0, BN)
            col_ok = cols < n_cols
            ok = row_ok[:, None] & col_ok[None, :]
            y = tl.load(y_ptr + rows_m[:, None] * y_row_stride + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            y += _update_tile(h_ptr, h_row_stride, b_ptr, b_sg, b_sp, b_sc, b_sr, groups_ptr, rows_per_item,
                              a_rank, rank, used_ptr, 1, 0, rows, rows_m, row_ok, cols, col_ok, BM, BN,
                              USED_IN_MEMORY, DOT_F32)
            g = y * rms * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_GATE:
                g *= tl.load(gate_ptr + item[:, None] * n_cols + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + rows_m[:, None] * n_cols + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            # The residual stream is bf16: round once here, and normalize the rounded values next.
            new = (x + g).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows_m[:, None] * n_cols + cols[None, :], new, mask=ok)
            if NEXT:
                new = new.to(tl.float32)
                next_squares += tl.sum(new * new, axis=1)
        if NEXT:
            tl.debug_barrier()  # the new rows this program stored, read back below
            next_rms = tl.rsqrt(next_squares / n_cols + next_eps)[:, None]
            amax = tl.zeros((BM,), dtype=tl.float32)
            for quantize in tl.static_range(2):  # the row's amax, then its FP8 values with that scale
                scale = tl.maximum(amax, 1e-12) / 448.0
                for c0 in range(0, n_cols, BN):
                    cols = c0 + tl.arange(0, BN)
                    col_ok = cols < n_cols
                    ok = row_ok[:, None] & col_ok[None, :]
                    z = tl.load(out_ptr + rows_m[:, None] * n_cols + cols[None, :], mask=ok, other=0.0).to(tl.float32)
                    z = z * next_rms * tl.load(next_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                    if NEXT_HAS_MOD:
                        z *= tl.load(next_mod_ptr + item[:, None] * n_cols + cols[None, :], mask=ok,
                                     other=0.0).to(tl.float32)
                    if quantize == 0:
                        amax = tl.maximum(amax, tl.max(tl.abs(z), axis=1))
                    else:
                        tl.store(q_ptr + rows_m[:, None] * n_cols + cols[None, :],
                                 tl.clamp(z / scale[:, None], -448.0, 448.0).to(q_ptr.dtype.element_ty), mask=ok)
            tl.store(s_ptr + rows_m, tl.maximum(amax, 1e-12) / 448.0, mask=row_ok)

    def _gated_residual_lora_op(x: torch.Tensor, extended: torch.Tensor, xq: torch.Tensor, x_scale: torch.Tensor,
                                out_features: int, weight: torch.Tensor, gate: torch.Tensor | None, rows_per_item: int,
                                eps: float, next_weight: torch.Tensor | None, next_mod: torch.Tensor | None,
                                next_eps: float, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, n_cols = x.shape
        lora, constants = _lora_args(extended, xq, x_scale, out_features, slot)
        out = torch.empty_like(x)
        quantized = next_weight is not None
        q = torch.empty((rows if quantized else 0, n_cols), dtype=fused_quant.FP8_DTYPE, device=x.device)
        s = torch.empty((rows if quantized else 0, 1), dtype=torch.float32, device=x.device)
        _gated_residual_lora_kernel[(triton.cdiv(rows, RESIDUAL_ROWS),)](
            x, extended, *lora, weight, gate if gate is not None else weight, out,
            next_weight if quantized else weight, next_mod if next_mod is not None else weight,
            q if quantized else out, s if quantized else out, rows, n_cols, extended.stride(0), rows_per_item, eps,
            next_eps, HAS_GATE=gate is not None, NEXT=quantized, NEXT_HAS_MOD=next_mod is not None,
            BM=RESIDUAL_ROWS, BN=RESIDUAL_COLUMNS, **constants, num_warps=RESIDUAL_WARPS,
        )
        return out, q, s

    def _gated_residual_lora_fake(x, extended, xq, x_scale, out_features, weight, gate, rows_per_item, eps,
                                  next_weight, next_mod, next_eps, slot):
        rows = x.shape[0] if next_weight is not None else 0
        return (torch.empty_like(x), x.new_empty((rows, x.shape[1]), dtype=fused_quant.FP8_DTYPE),
                x.new_empty((rows, 1), dtype=torch.float32))

    register_op("gated_residual_lora(Tensor x, Tensor extended, Tensor xq, Tensor x_scale, int out_features, "
                "Tensor weight, Tensor? gate, SymInt rows_per_item, float eps, Tensor? next_weight, Tensor? next_mod, "
                "float next_eps, Tensor slot) -> (Tensor, Tensor, Tensor)",
                _gated_residual_lora_op, _gated_residual_lora_fake)


def gated_residual_lora(x: torch.Tensor, linear, xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                        gate: torch.Tensor | None, eps: float,
                        next_norm: tuple[torch.Tensor, torch.Tensor | None, float] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`fused_quant.gated_residual(x, linear(xq, x_scale), ...)` for the output projection or w2 (an
    `Fp8Weight` with this forward's adapters) on the FP8 rows `xq`: its GEMM, then one kernel that adds
    the update, the gated norm and residual, and the next norm's FP8 rows (with `next_norm`)."""
    extended = _extended(linear, xq, x_scale)
    if not fused_quant.triton_available(extended.device):
        y = updated_rows_reference(extended, xq, x_scale, linear.out_features, linear.lora_slot)
        return fused_quant.gated_residual(x, y.view(x.shape), weight, gate, eps, next_norm)
    x2d = x.reshape(-1, x.shape[-1])
    gate2d, rows_per_item, next_w, next_mod2d, next_eps = fused_quant.residual_modulations(x2d, gate, next_norm)
    out, q, s = torch.ops.zimage.gated_residual_lora(x2d, extended, xq, x_scale, linear.out_features, weight, gate2d,
                                                     rows_per_item, eps, next_w, next_mod2d, float(next_eps),
                                                     linear.lora_slot)
    return out.view(x.shape), (q if next_w is not None else None), (s if next_w is not None else None)
