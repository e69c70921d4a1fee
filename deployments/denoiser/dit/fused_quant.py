"""Single-pass row kernels (Triton) around the DiT's FP8 GEMMs, with their eager references.

Every GEMM input inside a block is an FP8 (e4m3) row with its own scale, `amax / 448`. Inductor
generates the norm, modulation and quantization in front of a GEMM as looped reductions that read
each row twice (once for the RMS or the amax, once to write); one row of the DiT (3840 values, or
10240 after the SwiGLU) fits in one program's registers, so these kernels read every input row once:

- `norm_modulate_quant`: `RMSNorm(x) * w * mod[item]` to an FP8 row and its scale (before q/k/v and
  before w1/w3);
- `gated_residual`: `x + gate[item] * RMSNorm(y) * w` (after the attention's output projection and
  after w2); with `next_norm` it also runs the next `norm_modulate_quant` on the new `x` in the
  same pass (attention output -> feed-forward input: one kernel instead of two);
- `swiglu_quant`: `silu(a) * b` to an FP8 row and its scale (before w2).

A row is read as a power-of-two head and a masked power-of-two tail (3840 = 2048 + 1792 in a tail
of 2048, 10240 = 8192 + 2048), so almost no register goes to padding. `mod` and `gate` are per batch
item (`[B, D]`), the rows of item `b` being `b * rows_per_item ...`. Arithmetic is float32 from
load to store; the references below (`*_reference`) compute the same function eagerly in float32
and are what runs where Triton or CUDA is missing.
"""

from __future__ import annotations

import torch

from deployments.denoiser.dit.fp8 import FP8_ROW_AMAX_FLOOR as AMAX_FLOOR  # an all-zero row gets a finite scale

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value (the kernels write it as a literal, as they do the floor)

try:  # Triton comes with CUDA builds of torch; CPU builds run the references.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def triton_available(device: torch.device) -> bool:
    """Whether the kernels run for tensors on `device` (CUDA with Triton; elsewhere the references).

    Tests run the kernels on CPU tensors in Triton's interpreter by calling the `torch.ops.zimage`
    ops directly."""
    return triton is not None and device.type == "cuda"


_LIBRARY = torch.library.Library("zimage", "FRAGMENT")


def register_op(schema: str, kernel, fake) -> None:
    """Defines `torch.ops.zimage.<name>` with one kernel for every device and a shape-only fake for
    torch.compile's tracing. Plain `Library` registration: `torch.library.custom_op`'s per-call
    wrapper was the largest host cost of a 512x512 step (about 200 calls); without it the step's
    host time went from 35.0 to 31.7 ms on an H200 machine (RESULTS.md, round of 2026-12-01, commit 2183095)."""
    name = schema.split("(", 1)[0]
    _LIBRARY.define(schema)
    _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"zimage::{name}", fake, lib=_LIBRARY)


def row_split(n_cols: int) -> tuple[int, int]:
    """(head, tail) block widths: the largest power of two <= n_cols, and a power of two >= the rest."""
    if n_cols < 1:
        raise ValueError(f"a row needs at least one value, got {n_cols}")
    head = 1 << (n_cols.bit_length() - 1)
    rest = n_cols - head
    tail = 1 if rest == 0 else 1 << (rest - 1).bit_length()
    return head, tail


def _warps(n_cols: int) -> int:
    return 4 if n_cols <= 2048 else 8 if n_cols <= 4096 else 16


if triton is not None:

    @triton.jit
    def _load_row(ptr, row_start, n_cols, HEAD: tl.constexpr, TAIL: tl.constexpr):
        head = tl.arange(0, HEAD)
        tail = HEAD + tl.arange(0, TAIL)
        values_head = tl.load(ptr + row_start + head).to(tl.float32)
        values_tail = tl.load(ptr + row_start + tail, mask=tail < n_cols, other=0.0).to(tl.float32)
        return values_head, values_tail

    @triton.jit
    def _store_row(ptr, row_start, n_cols, values_head, values_tail, HEAD: tl.constexpr, TAIL: tl.constexpr):
        head = tl.arange(0, HEAD)
        tail = HEAD + tl.arange(0, TAIL)
        tl.store(ptr + row_start + head, values_head.to(ptr.dtype.element_ty))
        tl.store(ptr + row_start + tail, values_tail.to(ptr.dtype.element_ty), mask=tail < n_cols)

    @triton.jit
    def _rms_scale(values_head, values_tail, n_cols, eps):
        squares = tl.sum(values_head * values_head, axis=0) + tl.sum(values_tail * values_tail, axis=0)
        return tl.rsqrt(squares / n_cols + eps)

    @triton.jit
    def _quantize_store(q_ptr, s_ptr, row, row_start, n_cols, values_head, values_tail,
                        HEAD: tl.constexpr, TAIL: tl.constexpr):
        amax = tl.maximum(tl.max(tl.abs(values_head), axis=0), tl.max(tl.abs(values_tail), axis=0))
        scale = tl.maximum(amax, 1e-12) / 448.0
        quant_head = tl.clamp(values_head / scale, -448.0, 448.0)
        quant_tail = tl.clamp(values_tail / scale, -448.0, 448.0)
        _store_row(q_ptr, row_start, n_cols, quant_head, quant_tail, HEAD, TAIL)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _norm_modulate(values_head, values_tail, w_ptr, mod_ptr, item, n_cols, eps,
                       HAS_MOD: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr):
        rms = _rms_scale(values_head, values_tail, n_cols, eps)
        w_head, w_tail = _load_row(w_ptr, 0, n_cols, HEAD, TAIL)
        out_head = values_head * rms * w_head
        out_tail = values_tail * rms * w_tail
        if HAS_MOD:
            m_head, m_tail = _load_row(mod_ptr, item * n_cols, n_cols, HEAD, TAIL)
            out_head = out_head * m_head
            out_tail = out_tail * m_tail
        return out_head, out_tail

    @triton.jit
    def _norm_modulate_quant_kernel(x_ptr, w_ptr, mod_ptr, q_ptr, s_ptr, rows_per_item, n_cols, eps,
                                    HAS_MOD: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        start = row * n_cols
        x_head, x_tail = _load_row(x_ptr, start, n_cols, HEAD, TAIL)
        y_head, y_tail = _norm_modulate(x_head, x_tail, w_ptr, mod_ptr, row // rows_per_item, n_cols, eps,
                                        HAS_MOD, HEAD, TAIL)
        _quantize_store(q_ptr, s_ptr, row, start, n_cols, y_head, y_tail, HEAD, TAIL)

    @triton.jit
    def _gated_residual_kernel(x_ptr, y_ptr, w_ptr, gate_ptr, out_ptr, next_w_ptr, next_mod_ptr, q_ptr, s_ptr,
                               rows_per_item, n_cols, y_row_stride, eps, next_eps,
                               HAS_GATE: tl.constexpr, NEXT: tl.constexpr, NEXT_HAS_MOD: tl.constexpr,
                               HEAD: tl.constexpr, TAIL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        start = row * n_cols
        item = row // rows_per_item
        y_head, y_tail = _load_row(y_ptr, row * y_row_stride, n_cols, HEAD, TAIL)
        g_head, g_tail = _norm_modulate(y_head, y_tail, w_ptr, gate_ptr, item, n_cols, eps, HAS_GATE, HEAD, TAIL)
        x_head, x_tail = _load_row(x_ptr, start, n_cols, HEAD, TAIL)
        # The residual stream is bf16: round once here, and normalize the rounded values next.
        new_head = (x_head + g_head).to(out_ptr.dtype.element_ty)
        new_tail = (x_tail + g_tail).to(out_ptr.dtype.element_ty)
        _store_row(out_ptr, start, n_cols, new_head, new_tail, HEAD, TAIL)
        if NEXT:
            z_head, z_tail = _norm_modulate(new_head.to(tl.float32), new_tail.to(tl.float32), next_w_ptr,
                                            next_mod_ptr, item, n_cols, next_eps, NEXT_HAS_MOD, HEAD, TAIL)
            _quantize_store(q_ptr, s_ptr, row, start, n_cols, z_head, z_tail, HEAD, TAIL)

    @triton.jit
    def _swiglu_quant_kernel(h_ptr, q_ptr, s_ptr, n_cols, h_row_stride, HEAD: tl.constexpr, TAIL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        a_head, a_tail = _load_row(h_ptr, row * h_row_stride, n_cols, HEAD, TAIL)
        b_head, b_tail = _load_row(h_ptr, row * h_row_stride + n_cols, n_cols, HEAD, TAIL)
        y_head = a_head * tl.sigmoid(a_head) * b_head
        y_tail = a_tail * tl.sigmoid(a_tail) * b_tail
        _quantize_store(q_ptr, s_ptr, row, row * n_cols, n_cols, y_head, y_tail, HEAD, TAIL)


def _rows(x: torch.Tensor) -> torch.Tensor:
    if not x.is_contiguous():
        raise ValueError("the fused row kernels need contiguous rows")
    return x.reshape(-1, x.shape[-1])


def strided_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as `[rows, width]` without a copy, its rows possibly further apart than `width`: the output
    of an FP8 GEMM whose weight carries LoRA rows after its own (`lora.ops.fp8_lora_linear`), read by
    the kernels in place."""
    rows = x.view(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        raise ValueError("the fused row kernels need each row's values contiguous")
    return rows


def _per_item(values: torch.Tensor | None, rows: int, n_cols: int) -> tuple[torch.Tensor | None, int]:
    """A `[B, D]` (or `[B, 1, D]`) per-item vector, contiguous, and the rows each item covers."""
    if values is None:
        return None, max(rows, 1)
    values = values.reshape(-1, n_cols).contiguous()
    items = values.shape[0]
    if rows % items:
        raise ValueError(f"{rows} rows do not split evenly over {items} batch items")
    return values, rows // items


if triton is not None:
    # Registered as ops opaque to torch.compile: the compiled block calls them between its own
    # kernels. (As `triton_op`s, which inductor compiles itself, torch 2.11's inductor failed to
    # lower `_norm_modulate_quant_kernel` (LLVM pass failure) that Triton compiles fine on its own.)

    def _norm_modulate_quant_op(x: torch.Tensor, weight: torch.Tensor, mod: torch.Tensor | None,
                                rows_per_item: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        rows, n_cols = x.shape
        q = torch.empty((rows, n_cols), dtype=FP8_DTYPE, device=x.device)
        s = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        head, tail = row_split(n_cols)
        _norm_modulate_quant_kernel[(rows,)](
            x, weight, mod if mod is not None else weight, q, s, rows_per_item, n_cols, eps,
            HAS_MOD=mod is not None, HEAD=head, TAIL=tail, num_warps=_warps(n_cols),
        )
        return q, s

    def _norm_modulate_quant_fake(x, weight, mod, rows_per_item, eps):
        return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((x.shape[0], 1), dtype=torch.float32)

    register_op("norm_modulate_quant(Tensor x, Tensor weight, Tensor? mod, SymInt rows_per_item, float eps)"
                " -> (Tensor, Tensor)", _norm_modulate_quant_op, _norm_modulate_quant_fake)

    def _gated_residual_op(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                           rows_per_item: int, eps: float, next_weight: torch.Tensor | None,
                           next_mod: torch.Tensor | None, next_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, n_cols = x.shape
        out = torch.empty_like(x)
        quantized = next_weight is not None
        q = torch.empty((rows if quantized else 0, n_cols), dtype=FP8_DTYPE, device=x.device)
        s = torch.empty((rows if quantized else 0, 1), dtype=torch.float32, device=x.device)
        head, tail = row_split(n_cols)
        _gated_residual_kernel[(rows,)](
            x, y, weight, gate if gate is not None else weight, out,
            next_weight if quantized else weight, next_mod if next_mod is not None else weight,
            q if quantized else out, s if quantized else out,
            rows_per_item, n_cols, y.stride(0), eps, next_eps,
            HAS_GATE=gate is not None, NEXT=quantized, NEXT_HAS_MOD=next_mod is not None,
            HEAD=head, TAIL=tail, num_warps=_warps(n_cols),
        )
        return out, q, s

    def _gated_residual_fake(x, y, weight, gate, rows_per_item, eps, next_weight, next_mod, next_eps):
        rows = x.shape[0] if next_weight is not None else 0
        return (torch.empty_like(x), x.new_empty((rows, x.shape[1]), dtype=FP8_DTYPE),
                x.new_empty((rows, 1), dtype=torch.float32))

    register_op("gated_residual(Tensor x, Tensor y, Tensor weight, Tensor? gate, SymInt rows_per_item, float eps, "
                "Tensor? next_weight, Tensor? next_mod, float next_eps) -> (Tensor, Tensor, Tensor)",
                _gated_residual_op, _gated_residual_fake)

    def _swiglu_quant_op(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, width = h.shape
        n_cols = width // 2
        q = torch.empty((rows, n_cols), dtype=FP8_DTYPE, device=h.device)
        s = torch.empty((rows, 1), dtype=torch.float32, device=h.device)
        head, tail = row_split(n_cols)
        _swiglu_quant_kernel[(rows,)](h, q, s, n_cols, h.stride(0), HEAD=head, TAIL=tail, num_warps=_warps(n_cols))
        return q, s

    def _swiglu_quant_fake(h):
        rows, width = h.shape
        return h.new_empty((rows, width // 2), dtype=FP8_DTYPE), h.new_empty((rows, 1), dtype=torch.float32)

    register_op("swiglu_quant(Tensor h) -> (Tensor, Tensor)", _swiglu_quant_op, _swiglu_quant_fake)


def norm_modulate_quant(x: torch.Tensor, weight: torch.Tensor, mod: torch.Tensor | None, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 rows of `RMSNorm(x) * weight * mod[item]` and their scales `[rows, 1]` (float32)."""
    rows2d = _rows(x)
    rows, n_cols = rows2d.shape
    mod2d, rows_per_item = _per_item(mod, rows, n_cols)
    if not triton_available(x.device):
        return norm_modulate_quant_reference(rows2d, weight, mod2d, rows_per_item, eps)
    return torch.ops.zimage.norm_modulate_quant(rows2d, weight, mod2d, rows_per_item, eps)


def residual_modulations(x2d: torch.Tensor, gate: torch.Tensor | None,
                         next_norm: tuple[torch.Tensor, torch.Tensor | None, float] | None):
    """The gated residual kernels' per-item arguments for rows `x2d`: the gate as rows, the rows per batch
    item (the gate's, else the next modulation's), and the next norm's weight, modulation rows and eps."""
    rows, n_cols = x2d.shape
    gate2d, rows_per_item = _per_item(gate, rows, n_cols)
    next_w, next_mod, next_eps = next_norm if next_norm is not None else (None, None, 0.0)
    next_mod2d, next_rows_per_item = _per_item(next_mod, rows, n_cols)
    if gate2d is not None and next_mod2d is not None and next_rows_per_item != rows_per_item:
        raise ValueError("gate and next modulation must have the same batch items")
    rows_per_item = rows_per_item if gate2d is not None else next_rows_per_item
    return gate2d, rows_per_item, next_w, next_mod2d, next_eps


def gated_residual(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float,
                   next_norm: tuple[torch.Tensor, torch.Tensor | None, float] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`x + gate[item] * RMSNorm(y) * weight` (bf16, x's shape), and with `next_norm = (w, mod, eps)`
    the FP8 rows and scales of `RMSNorm(new x) * w * mod[item]` (else `None, None`)."""
    if x.shape != y.shape:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} differ")
    x2d, y2d = _rows(x), strided_rows(y)
    gate2d, rows_per_item, next_w, next_mod2d, next_eps = residual_modulations(x2d, gate, next_norm)
    if not triton_available(x.device):
        out, q, s = gated_residual_reference(x2d, y2d, weight, gate2d, rows_per_item, eps,
                                             next_w, next_mod2d, next_eps)
        return out.view(x.shape), q, s
    out, q, s = torch.ops.zimage.gated_residual(x2d, y2d, weight, gate2d, rows_per_item, eps,
                                                next_w, next_mod2d, float(next_eps))
    return out.view(x.shape), (q if next_w is not None else None), (s if next_w is not None else None)


def swiglu_quant(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 rows of `silu(a) * b` for `h = [a | b]` (the fused w1/w3 GEMM's output) and their scales."""
    h2d = strided_rows(h)
    if h2d.shape[1] % 2:
        raise ValueError(f"swiglu_quant needs an even row width, got {h2d.shape[1]}")
    if not triton_available(h.device):
        return swiglu_quant_reference(h2d)
    return torch.ops.zimage.swiglu_quant(h2d)


# Eager references: the same functions in float32, used where Triton cannot run and by the tests.


def quantize_rows_reference(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise FP8 of float32 rows: `(y / scale).clamp(+-448)` with `scale = max(amax, floor) / 448`."""
    scale = y.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR) / FP8_MAX
    return (y / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _norm_modulate_reference(x: torch.Tensor, weight: torch.Tensor, mod: torch.Tensor | None,
                             rows_per_item: int, eps: float) -> torch.Tensor:
    x = x.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if mod is not None:
        y = y * mod.float().repeat_interleave(rows_per_item, dim=0)
    return y


def norm_modulate_quant_reference(x: torch.Tensor, weight: torch.Tensor, mod: torch.Tensor | None,
                                  rows_per_item: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows_reference(_norm_modulate_reference(x, weight, mod, rows_per_item, eps))


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None,
                             rows_per_item: int, eps: float, next_weight: torch.Tensor | None = None,
                             next_mod: torch.Tensor | None = None, next_eps: float = 0.0,
                             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    out = (x.float() + _norm_modulate_reference(y, weight, gate, rows_per_item, eps)).to(x.dtype)
    if next_weight is None:
        return out, None, None
    q, s = quantize_rows_reference(_norm_modulate_reference(out, next_weight, next_mod, rows_per_item, next_eps))
    return out, q, s


def swiglu_quant_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = h.float().chunk(2, dim=-1)
    return quantize_rows_reference(torch.nn.functional.silu(a) * b)
