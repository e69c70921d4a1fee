"""The LoRA down-projection on FP8 rows as a Triton GEMM shaped for its skinny output.

`h = (x_fp8 @ A_fp8^T) * x_scale[row] * a_scale[col]`, `[rows, N]` bf16, with N the forward's
stacked rank (P parts x R, times the groups: 32 to a few hundred) and K the linear's input (3840 or
10240). cuBLAS's FP8 GEMM (`torch._scaled_mm`) tiles such an output 128 rows at a time: at 1024x1024
(4256 rows) that is 34 tiles for 132 multiprocessors, each walking all of K, and it took 32 to 50 us
per linear on an H100 (RESULTS.md, LoRA round of 2026-12-07) where reading the rows once takes about
6 us. Here a program takes 64 rows and a narrow block of N columns (32, or 64 for wide N): several
times as many programs, those that share rows launched side by side (N varies fastest), so a row
block is read from memory once and from L2 by its neighbours.

`down_projection` runs it on CUDA tensors where Triton is installed; if the kernel cannot be built
there, it says so once in the log and uses `torch._scaled_mm` from then on (the same function). For
CPU tensors it is the dequantized product. Tests run the kernel in Triton's interpreter on float32
stand-ins.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_M = 64
BLOCK_K = 128

if triton is not None:

    @triton.jit
    def _down_kernel(x_ptr, xs_ptr, a_ptr, as_ptr, h_ptr, M, N, K,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rows < M, cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + ks) < K
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + k0 + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_ptr + cols[None, :].to(tl.int64) * K + k0 + ks[:, None],
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(x, a, acc)
        x_scale = tl.load(xs_ptr + rows, mask=row_ok, other=0.0)
        a_scale = tl.load(as_ptr + cols, mask=col_ok, other=0.0)
        h = acc * x_scale[:, None] * a_scale[None, :]
        tl.store(h_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def _block_n(n: int) -> int:
    return 32 if n <= 128 else 64


def down_kernel(x: torch.Tensor, x_scale: torch.Tensor, a: torch.Tensor, a_scale: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """The Triton kernel on `x` `[M, K]`, `x_scale` `[M, 1]`, `a` `[N, K]`, `a_scale` `[1, N]` (any
    device Triton runs on: CUDA, or CPU tensors in its interpreter)."""
    m, k = x.shape
    n = a.shape[0]
    h = torch.empty((m, n), dtype=dtype, device=x.device)
    block_n = _block_n(n)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, BLOCK_M))
    _down_kernel[grid](x.contiguous(), x_scale.contiguous(), a.contiguous(), a_scale.contiguous(), h, m, n, k,
                       BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K, num_warps=4, num_stages=4)
    return h


def down_projection(x: torch.Tensor, x_scale: torch.Tensor, a: torch.Tensor, a_scale: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """`(x @ a^T) * x_scale * a_scale` for FP8 `x` `[M, K]` and `a` `[N, K]` (see the module docstring)."""
    global _kernel_failed
    if x.device.type == "cuda":
        if triton is not None and not _kernel_failed:
            try:
                return down_kernel(x, x_scale, a, a_scale, dtype)
            except Exception:  # noqa: BLE001 - a Triton build problem; the GEMM below computes the same
                _kernel_failed = True
                logger.exception("the LoRA down-projection kernel failed to run; using torch._scaled_mm from now on")
        return torch._scaled_mm(x, a.t(), scale_a=x_scale, scale_b=a_scale.contiguous(), out_dtype=dtype,
                                use_fast_accum=True)
    return ((x.float() * x_scale) @ a.float().t() * a_scale).to(dtype)  # the same function on a CPU


_kernel_failed = False
