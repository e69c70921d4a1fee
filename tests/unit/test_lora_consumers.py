"""The LoRA up-projection inside the q/k/v and SwiGLU kernels (deployments.denoiser.lora.consumers), in
Triton's interpreter on CPU tensors, against the update in float32 followed by the plain kernels'
references. As in test_fused_fp8, the kernels write float32 where they would write FP8, so every
index, mask, group and scale is checked exactly; the real FP8 rounding runs on the GPU
(tests/gpu/test_gpu_lora.py).

Cases: one image with its adapter's A in the linear's tail; two images with different groups (and
the empty group); a rank below the tail's; B zero-padded past the rank in use, which the kernels read
from the device (the CUDA graphs' static factors); A that did not fit the tail (the down-projection's
own GEMM); row counts that leave a tile part empty and tiles that span two images.
"""

from __future__ import annotations

import pytest
import torch

from deployments.denoiser.dit import fp8_attention, fused_quant
from deployments.denoiser.lora import consumers, ops, residual_consumer  # noqa: F401 - registers gated_residual_lora
from tests.unit.test_fused_fp8 import interpreted, make, reference_unrounded  # noqa: F401 - a fixture

SLOT = torch.tensor(987654)
TAIL_SPARE = 8  # tail columns past the ones in use (never read)

# (items, groups, a_rank, rank, used rank on the device or None, in_tail)
CASES = {
    "one image, A in the tail": (1, 1, 16, 16, None, True),
    "two images, two groups": (2, 2, 16, 16, None, True),
    "rank below the tail's": (1, 1, 32, 16, None, True),
    "B padded past the rank in use": (1, 1, 48, 48, 32, True),
    "A in a GEMM of its own": (2, 2, 16, 16, None, False),
}


def factors(parts: int, part_out: int, d_in: int, items: int, groups: int, a_rank: int, rank: int,
            used: int | None, in_tail: bool, rows: int, seed: int):
    """An extended GEMM output `[rows, out + tail]` (bf16, h in its tail columns where `in_tail`), the FP8
    rows x it came from, and the factors registered for `SLOT`."""
    g = torch.Generator().manual_seed(seed)
    out = parts * part_out
    tail = groups * parts * a_rank
    x = (torch.randn(rows, d_in, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    x_scale = torch.rand(rows, 1, generator=g) * 0.02 + 0.01
    a = (torch.randn(groups, parts, a_rank, d_in, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    a_scale = torch.rand(groups, parts, a_rank, generator=g) * 1e-3
    b = make(groups, parts, part_out, rank, scale=0.5, seed=seed + 1)
    used_rank = None
    if used is not None:  # as the CUDA graphs' static factors, whose B is zero past the rank in use: here
        b[..., used:] = float("nan")  # NaN, so that reading them shows
        used_rank = torch.tensor([used], dtype=torch.int32)
    group_of = torch.tensor([(i + 1) % groups for i in range(items)], dtype=torch.int64)
    extended = torch.full((rows, out + tail + TAIL_SPARE), float("nan"), dtype=torch.bfloat16)
    extended[:, :out] = make(rows, out, scale=2, seed=seed + 2)
    if in_tail:
        extended[:, out : out + tail] = ops._down(x, x_scale, a.reshape(-1, d_in), a_scale.reshape(1, -1),
                                                  torch.bfloat16)
    ops.FACTORS[int(SLOT)] = ops.SlotFactors(a, a_scale, b, group_of, in_tail, used_rank)
    return extended, x, x_scale, out


@pytest.fixture
def slot():
    yield SLOT
    ops.FACTORS.pop(int(SLOT), None)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rows_per_item", [20, 33])
def test_qkv_kernel_adds_the_update(interpreted, slot, case, rows_per_item):
    items, groups, a_rank, rank, used, in_tail = CASES[case]
    heads, head_dim, d_in = 2, 32, 48
    rows = items * rows_per_item
    extended, x, x_scale, out = factors(3, heads * head_dim, d_in, items, groups, a_rank, rank, used, in_tail, rows,
                                        seed=3)
    wq, wk = make(head_dim, seed=1), make(head_dim, seed=2)
    angles = torch.rand(rows, head_dim // 2, generator=torch.Generator().manual_seed(3)) * 6.28
    rope = torch.stack((angles.cos(), angles.sin()), dim=-1)
    qk_descale = fp8_attention.qk_static_scales(wq, wk)
    q, k, v, v_descale = torch.ops.zimage.qkv_norm_rope_quant_lora(extended, x, x_scale, out, wq, wk, rope, qk_descale,
                                                                   heads, 1e-5, 1e-5, slot)
    qkv = consumers.updated_rows_reference(extended, x, x_scale, out, slot)
    plain = extended[:, :out].float()
    assert (qkv - plain).abs().max() > 0.05 * plain.abs().max()  # the update is no rounding error
    torch.testing.assert_close(v_descale, fp8_attention.v_descale_of(qkv), rtol=1e-5, atol=0)
    want = fp8_attention.qkv_norm_rope_quant_reference(qkv, wq, wk, rope, qk_descale, v_descale, heads, 1e-5, 1e-5)
    for got, expected in zip((q, k, v), want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("case", CASES)
def test_swiglu_kernel_adds_the_update(interpreted, slot, case):
    items, groups, a_rank, rank, used, in_tail = CASES[case]
    rows, n_cols, d_in = items * 21, 200, 48  # 200: a column tile only partly used
    extended, x, x_scale, out = factors(2, n_cols, d_in, items, groups, a_rank, rank, used, in_tail, rows, seed=5)
    q, s = torch.ops.zimage.swiglu_quant_lora(extended, x, x_scale, out, slot)
    h = consumers.updated_rows_reference(extended, x, x_scale, out, slot)
    a, b = h.chunk(2, dim=-1)
    want_q, want_s = reference_unrounded(torch.nn.functional.silu(a) * b)
    plain_a, plain_b = extended[:, :n_cols].float(), extended[:, n_cols:out].float()
    plain_q, _ = reference_unrounded(torch.nn.functional.silu(plain_a) * plain_b)
    assert (want_q - plain_q).abs().max() > 20  # the update moves the FP8 values, not only their rounding
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=0)
    torch.testing.assert_close(q, want_q, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fused_next", [True, False])
def test_gated_residual_kernel_adds_the_update(interpreted, slot, case, fused_next):
    """After the output projection (with the next norm's FP8 rows) and after w2 (without)."""
    items, groups, a_rank, rank, used, in_tail = CASES[case]
    rows, n_cols, d_in = items * 21, 200, 48
    extended, x_fp8, x_scale, out = factors(1, n_cols, d_in, items, groups, a_rank, rank, used, in_tail, rows, seed=9)
    x = make(rows, n_cols, scale=3, seed=10)
    w, gate, w2, mod = make(n_cols, seed=11), make(items, n_cols, seed=12), make(n_cols, seed=13), make(items, n_cols,
                                                                                                           seed=14)
    next_args = (w2, mod, 1e-6) if fused_next else (None, None, 0.0)
    got, q, s = torch.ops.zimage.gated_residual_lora(x, extended, x_fp8, x_scale, out, w, gate, rows // items, 1e-5,
                                                     *next_args, slot)
    y = consumers.updated_rows_reference(extended, x_fp8, x_scale, out, slot)
    want, _, _ = fused_quant.gated_residual_reference(x, y, w, gate, rows // items, 1e-5)
    plain, _, _ = fused_quant.gated_residual_reference(x, extended[:, :out].float(), w, gate, rows // items, 1e-5)
    assert (want.float() - plain.float()).abs().max() > 0.1  # the update changes the new rows
    # one bf16 rounding of the same float32 sum (the interpreter's bf16 cast truncates): an ulp apart
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-2)
    if not fused_next:
        assert q.numel() == 0 and s.numel() == 0
        return
    # the next norm reads the new rows as rounded: the kernel's own
    want_q, want_s = fused_quant.norm_modulate_quant_reference(got, w2, mod, rows // items, 1e-6)
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=0)
    torch.testing.assert_close(q, want_q, rtol=1e-4, atol=2e-3)


def test_each_row_reads_its_own_groups_factors(interpreted, slot):
    """Group 0 holds zero factors (the rows without adapters): those rows come out as without LoRA."""
    rows, n_cols, d_in = 2 * 24, 64, 48
    extended, x, x_scale, out = factors(2, n_cols, d_in, 2, 2, 16, 16, None, True, rows, seed=7)
    b, groups = ops.FACTORS[int(slot)].b, ops.FACTORS[int(slot)].groups
    b[0].zero_()  # group 0: no adapter; the second image (rows 24..47) is in it
    q, s = torch.ops.zimage.swiglu_quant_lora(extended, x, x_scale, out, slot)
    plain = extended[:, :out].float()
    want_q, want_s = reference_unrounded(torch.nn.functional.silu(plain[:, :n_cols]) * plain[:, n_cols:])
    assert groups.tolist() == [1, 0]
    torch.testing.assert_close(q[24:], want_q[24:], rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(s[24:], want_s[24:], rtol=1e-5, atol=0)
    assert not torch.allclose(q[:24], want_q[:24], rtol=1e-2, atol=1)
