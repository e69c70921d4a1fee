"""The up-projection folded into the base FP8 GEMM (deployments.denoiser.lora.fold), on the CPU: the
folded linear against the base GEMM plus the unfolded update, several items in their own groups, the
row kernel in Triton's interpreter against its torch reference, and what stays as it was."""

from __future__ import annotations

import pytest
import torch

from deployments.denoiser.dit.fp8_linear import Fp8Weight
from deployments.denoiser.lora import fold, layout, ops

FP8 = torch.float8_e4m3fn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def carriers(blocks: int, d_in: int, d_out: int, seed: int) -> list[Fp8Weight]:
    torch.manual_seed(seed)
    return [Fp8Weight.from_linear(torch.nn.Linear(d_in, d_out, bias=False).requires_grad_(False))
            for _ in range(blocks)]


def factors(blocks: int, groups: int, parts: int, rank: int, d_in: int, part_out: int, seed: int,
            strength: float = 0.005):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(blocks, groups, parts, rank, d_in, generator=g) / d_in**0.5
    a_q, a_s = layout.quantize_rows(a)
    a_scale = a_s * (torch.rand(blocks, groups, parts, rank, generator=g) + 0.5)
    b = (torch.randn(blocks, groups, parts, part_out, rank, generator=g) * strength).to(torch.bfloat16)
    return a_q, a_scale, b


def fp8_rows(rows: int, d_in: int, seed: int):
    x = torch.randn(rows, d_in, generator=torch.Generator().manual_seed(seed)) * 3
    scale = x.abs().amax(-1, keepdim=True) / 448
    return (x / scale).to(FP8), scale


def setup(groups_of_items, rank=16, blocks=2, d_in=64, parts=3, seed=0, capacity_rank=fold.FOLD_RANK,
          strength=0.005):
    linears = carriers(blocks, d_in, parts * d_in, seed)
    weights = [c.weight.clone() for c in linears]
    kind = fold.FoldedKind(linears, parts, rank=capacity_rank)
    groups = torch.tensor(groups_of_items)
    a, a_scale, b = factors(blocks, int(groups.max()) + 1, parts, rank, d_in, d_in, seed + 1, strength)
    skip = int(groups.max() > 0)
    if skip:  # as `slots.LoraSlots` plans them: group 0 is the empty set where some row has none
        a_scale[:, 0], b[:, 0] = 0, 0
    kind.pending = (b, 1, skip)
    return linears, weights, kind, groups, (a, a_scale, b)


def run_folded(linears, kind, groups, fs, x, xs):
    a, a_scale, b = fs
    outs = []
    for block, linear in enumerate(linears):
        ops.FACTORS[1000 + block] = (a[block], a_scale[block], b[block], groups)
        fold.FOLDS[1000 + block] = (kind, block)
        outs.append(fold.folded_linear(x, xs, linear.weight, linear.scale, 1000 + block))
    return outs


def exact(linear, x, xs, a, a_scale, b, groups) -> torch.Tensor:
    """The linear plus each item's update, from the same FP8 values, in float64."""
    rows = x.double() * xs.double()
    y = rows @ (linear.weight.double() * linear.scale.double().t()).t()
    items, parts = groups.shape[0], a.shape[1]
    y4 = y.view(items, -1, parts, y.shape[1] // parts)
    for i, group in enumerate(groups.tolist()):
        for p in range(parts):
            h = rows.view(items, -1, rows.shape[1])[i] @ (a[group, p].double() * a_scale[group, p, :, None].double()).t()
            y4[i, :, p] += h @ b[group, p].double().t()
    return y


@pytest.mark.parametrize("strength", [0.005, 0.05, 0.5])
def test_the_folded_linear_is_the_base_gemm_plus_the_update(strength):
    """Three items over two adapters (and one item without), updates of 4%, 37% and 370% of the
    output: within FP8's rounding of the update (h' and B' are FP8, 5% of it) of the float64 sum, as
    the unfolded update (`ops.update`) is within bf16's. With this tiny K (64) the two stronger ones
    clamp h', and the residual kernel adds back what the clamp cut off."""
    linears, _, kind, groups, fs = setup([1, 0, 2, 1], strength=strength)
    x, xs = fp8_rows(4 * 6, 64, seed=5)
    folded = run_folded(linears, kind, groups, fs, x, xs)
    a, a_scale, b = fs
    clamped = 0
    for block, linear in enumerate(linears):
        base = linear(x, xs)
        want = exact(linear, x, xs, a[block], a_scale[block], b[block], groups)
        unfolded = ops.update(base.clone(), x, xs, a[block], a_scale[block], b[block], groups)
        update_size = rel_err(want, base)
        assert rel_err(folded[block], want) <= rel_err(unfolded, want) + 0.05 * update_size
        h = ops._down(x, xs, a[block, 1:].reshape(-1, 64), a_scale[block, 1:].reshape(1, -1), torch.bfloat16)
        clamped += int((h.float() * kind.inv_w[block, : h.shape[1]] / xs).abs().gt(448).sum())
        item_without = slice(6, 12)  # item 1 is in group 0, the empty set: only its base
        assert torch.equal(folded[block][item_without], base[item_without])
    assert (clamped > 0) == (strength > 0.01)  # the weakest clamps nothing, the others do


def test_the_fold_fills_once_per_factors_and_blocks_are_views_of_one_tensor():
    linears, weights, kind, groups, fs = setup([0])
    for linear, weight in zip(linears, weights):
        assert torch.equal(linear.weight.view(torch.uint8), weight.view(torch.uint8))
        assert linear.weight.untyped_storage().data_ptr() == kind.wide.untyped_storage().data_ptr()
    x, xs = fp8_rows(8, 64, seed=2)
    first = run_folded(linears, kind, groups, fs, x, xs)
    assert kind.holds == 1
    kind.wide[..., 64:].zero_()  # the same serial again: not filled again, so the zeros stay
    again = run_folded(linears, kind, groups, fs, x, xs)
    assert torch.equal(again[0], linears[0](x, xs)) and not torch.equal(first[0], again[0])


def test_factors_over_the_capacity_run_the_unfolded_update():
    linears, _, kind, groups, fs = setup([1, 2], rank=32, capacity_rank=32)  # 2 groups x 3 parts x 32 > 96
    x, xs = fp8_rows(2 * 4, 64, seed=3)
    folded = run_folded(linears, kind, groups, fs, x, xs)
    a, a_scale, b = fs
    want = ops.update(linears[0](x, xs), x, xs, a[0], a_scale[0], b[0], groups)
    assert torch.equal(folded[0], want)
    assert kind.holds is None  # nothing was folded


@pytest.fixture
def interpreted():
    """Triton's interpreter on CPU tensors (tests/conftest.py sets it before the kernels are defined)."""
    if fold.triton is None:
        pytest.skip("Triton is not installed")
    from triton import knobs

    if not knobs.runtime.interpret:
        pytest.skip("the kernels were defined for the GPU (TRITON_INTERPRET unset)")


def test_the_row_kernel_matches_its_reference(interpreted):
    """`fold_rows` in Triton's interpreter: the FP8 rows copied, h' scaled and clamped, other groups'
    columns 0. The interpreter's float-to-FP8 cast is not the GPU's rounding (tests/unit/
    test_fused_fp8.py), so h' is made of FP8 values and the scales are powers of two: every value is
    exact and any difference is an index, mask or scale (the rounding is checked on the GPU)."""
    g = torch.Generator().manual_seed(1)
    x, _ = fp8_rows(3 * 5, 80, seed=4)
    xs = 2.0 ** -torch.randint(2, 6, (15, 1), generator=g).float()
    h = (torch.randn(15, 96, generator=g) * 16).to(FP8).to(torch.bfloat16)
    inv_w = 2.0 ** -torch.randint(0, 4, (96,), generator=g).float()
    groups = torch.tensor([1, 0, 1])
    want = fold.fold_rows_reference(x, h, xs, inv_w, groups, 48)
    got = fold.launch_fold_rows(x, h, xs, inv_w, groups, 48)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert want[5:10, 80:128].float().any() and not want[5:10, 128:].float().any()  # item 1: group 0 only
    assert want[:, 80:].float().abs().max() == 448  # some were clamped


def test_the_residual_kernel_matches_its_reference(interpreted):
    """`clamp_residual` in Triton's interpreter: rows with a clamped h' get the missing update (other
    groups' columns left out), the rest of y is left exactly as it was."""
    g = torch.Generator().manual_seed(3)
    groups, parts, part_out, rank, rows = torch.tensor([1, 0, 1]), 3, 40, 16, 3 * 20
    b = (torch.randn(2, parts, part_out, rank, generator=g) * 0.1).to(torch.bfloat16)
    h = (torch.randn(rows, 2 * parts * rank, generator=g) * 0.1).to(torch.bfloat16)
    xs = torch.rand(rows, 1, generator=g) * 0.01 + 0.001
    inv_w = torch.full((2 * parts * rank,), 0.5)
    h[:3] *= 1000  # item 0's first rows: clamped
    y = torch.randn(rows, parts * part_out, generator=g).to(torch.bfloat16)
    want = fold.clamp_residual_reference(y.clone(), h, xs, inv_w, groups, b)
    got = fold.launch_clamp_residual(y.clone(), h, xs, inv_w, groups, b)
    assert rel_err(got, want) < 1e-2 and not torch.equal(want[:3], y[:3])
    assert torch.equal(got[32:], y[32:])  # row blocks of 32 without a clamp: untouched
