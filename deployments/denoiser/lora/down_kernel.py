"""The LoRA down-projection on FP8 rows as a Triton GEMM shaped for its skinny output.

`h = (x_fp8 @ A_fp8^T) * x_scale[row] * a_scale[col]`, `[rows, N]` bf16, with N the forward's
stacked rank (P parts x R, times the groups: 32 to a few hundred) and K the linear's input (3840 or
10240). Such an output has few tiles: at 1024x1024 (4256 rows) and N = 32, 67 blocks of 64 rows for
132 multiprocessors, each walking all of K. cuBLAS's FP8 GEMM (`torch._scaled_mm`) took 34 to 52 us
per linear on an H100 and a one-pass Triton kernel 39 to 56 us (RESULTS.md, LoRA rounds of
2026-12-07), where reading the rows once takes about 6 us: latency along K, not bandwidth.

So K is split: a program takes 64 rows, a narrow block of N columns (32, or 64 for wide N) and one
slice of K, enough slices for about four programs per multiprocessor, and writes its float32
partial sums; a second kernel adds the slices in a fixed order (deterministic, unlike atomics) and
applies both scales. Where the rows alone fill the GPU (large batches), one slice: the first kernel
scales and writes h itself.

`down_projection` runs it on CUDA tensors where Triton is installed; if the kernel cannot be built
there, it says so once in the log and uses `torch._scaled_mm` from then on (the same function). For
CPU tensors it is the dequantized product. Tests run the kernel in Triton's interpreter on float32
stand-ins.
"""

from __future__ import annotations

import functools
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
    def _down_kernel(x_ptr, xs_ptr, a_ptr, as_ptr, out_ptr, M, N, K, K_SLICE,
                     SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rows < M, cols < N
        k_lo = pid_k * K_SLICE
        k_hi = tl.minimum(k_lo + K_SLICE, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_ok = (k0 + ks) < k_hi
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + k0 + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_ptr + cols[None, :].to(tl.int64) * K + k0 + ks[:, None],
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(x, a, acc)
        offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
        if SPLIT:  # this slice's float32 partial sums; `_sum_slices_kernel` adds them and scales
            tl.store(out_ptr + pid_k.to(tl.int64) * M * N + offsets, acc, mask=row_ok[:, None] & col_ok[None, :])
        else:
            x_scale = tl.load(xs_ptr + rows, mask=row_ok, other=0.0)
            a_scale = tl.load(as_ptr + cols, mask=col_ok, other=0.0)
            h = acc * x_scale[:, None] * a_scale[None, :]
            tl.store(out_ptr + offsets, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _sum_slices_kernel(partial_ptr, xs_ptr, as_ptr, h_ptr, M, N, SLICES, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offsets < M * N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(SLICES):
            acc += tl.load(partial_ptr + s * M * N + offsets, mask=ok, other=0.0)
        x_scale = tl.load(xs_ptr + offsets // N, mask=ok, other=0.0)
        a_scale = tl.load(as_ptr + offsets % N, mask=ok, other=0.0)
        tl.store(h_ptr + offsets, (acc * x_scale * a_scale).to(h_ptr.dtype.element_ty), mask=ok)


def _block_n(n: int) -> int:
    return 32 if n <= 128 else 64


PROGRAMS_PER_SM = 4


def k_slices(tiles: int, k: int, sms: int) -> int:
    """How many slices of K: about `PROGRAMS_PER_SM` programs per multiprocessor, each slice at least
    two blocks of K."""
    most = max(1, k // (2 * BLOCK_K))
    return max(1, min(most, -(-PROGRAMS_PER_SM * sms // tiles)))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100's count, for the interpreter's runs


def down_kernel(x: torch.Tensor, x_scale: torch.Tensor, a: torch.Tensor, a_scale: torch.Tensor,
                dtype: torch.dtype, slices: int | None = None) -> torch.Tensor:
    """The Triton kernels on `x` `[M, K]`, `x_scale` `[M, 1]`, `a` `[N, K]`, `a_scale` `[1, N]` (any
    device Triton runs on: CUDA, or CPU tensors in its interpreter); `slices` of K (default: `k_slices`)."""
    m, k = x.shape
    n = a.shape[0]
    h = torch.empty((m, n), dtype=dtype, device=x.device)
    block_n = _block_n(n)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, BLOCK_M)
    slices = slices or k_slices(tiles, k, _multiprocessors(x.device))
    k_slice = triton.cdiv(triton.cdiv(k, slices), BLOCK_K) * BLOCK_K
    slices = triton.cdiv(k, k_slice)
    x, x_scale, a, a_scale = x.contiguous(), x_scale.contiguous(), a.contiguous(), a_scale.contiguous()
    split = slices > 1
    out = torch.empty((slices, m, n), dtype=torch.float32, device=x.device) if split else h
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, BLOCK_M), slices)
    _down_kernel[grid](x, x_scale, a, a_scale, out, m, n, k, k_slice,
                       SPLIT=split, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K, num_warps=4, num_stages=4)
    if split:
        block = 1024
        _sum_slices_kernel[(triton.cdiv(m * n, block),)](out, x_scale, a_scale, h, m, n, slices, BLOCK=block,
                                                          num_warps=4)
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
