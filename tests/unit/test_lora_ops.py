"""The unmerged LoRA update (deployments.denoiser.lora.ops, layout, slots) on the CPU, against torch
references in float64: both kernel families (dense rows; FP8 rows with their scales, as the fused FP8
blocks hand them), several items with their own groups, and the factors a forward stacks."""

from __future__ import annotations

import pytest
import torch

from deployments.denoiser.lora import layout, ops
from deployments.denoiser.lora.adapter import LoraAdapter
from deployments.denoiser.lora.graph_factors import GraphFactors
from deployments.denoiser.lora.slots import install_lora
from deployments.weights import loading
from deployments.denoiser.lora.random_adapters import random_factors

CPU = torch.device("cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def factors(groups: int, parts: int, rank: int, d_in: int, part_out: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(groups, parts, rank, d_in, generator=g) / d_in**0.5
    a_scale = torch.rand(groups, parts, rank, generator=g) + 0.5
    b = torch.randn(groups, parts, part_out, rank, generator=g)
    return a, a_scale, b


def reference(y, x, a, a_scale, b, groups):
    """Each item's rows plus `(x A^T * a_scale) B^T` of its group, part by part, in float64."""
    batch, parts = groups.shape[0], a.shape[1]
    x3 = x.double().view(batch, -1, x.shape[-1])
    out = y.double().view(batch, x3.shape[1], parts, -1).clone()
    for i, group in enumerate(groups.tolist()):
        for p in range(parts):
            h = x3[i] @ a[group, p].double().t() * a_scale[group, p].double()
            out[i, :, p] += h @ b[group, p].double().t()
    return out.view(y.shape)


@pytest.mark.parametrize("groups", [[0], [0, 2, 1, 0], [1, 1], [0, 0]])
@pytest.mark.parametrize("parts", [1, 3])
def test_dense_rows(groups, parts):
    batch, seq, d_in, part_out, rank = len(groups), 5, 24, 8, 16
    a, a_scale, b = factors(max(groups) + 1, parts, rank, d_in, part_out, seed=len(groups) + parts)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, seq, d_in, generator=g)
    y = torch.randn(batch, seq, parts * part_out, generator=g)
    groups = torch.tensor(groups)
    want = reference(y, x, a, a_scale, b, groups)
    got = ops.update(y.clone(), x, None, a, a_scale, b, groups)
    assert rel_err(got, want) < 1e-6


def test_fp8_rows_read_the_quantized_rows_and_their_scales():
    """The fused blocks' linears: x as FP8 rows `[rows, in]` with `[rows, 1]` scales, A in FP8 with its
    row scales (layout.quantize_rows); y in bf16. Against the same dequantized values in float64."""
    batch, seq, d_in, part_out, parts = 3, 4, 32, 16, 2
    a, a_scale, b = factors(2, parts, 16, d_in, part_out, seed=3)
    a_q, a_s = layout.quantize_rows(a)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(batch * seq, d_in, generator=g) * 3
    x_scale = x.abs().amax(-1, keepdim=True) / 448
    x_q = (x / x_scale).to(torch.float8_e4m3fn)
    y = torch.randn(batch * seq, parts * part_out, generator=g).to(torch.bfloat16)
    groups = torch.tensor([1, 0, 1])
    want = reference(y, x_q.float() * x_scale, a_q.float(), a_s * a_scale, b.to(torch.bfloat16), groups)
    got = ops.update(y.clone(), x_q, x_scale, a_q, a_s * a_scale, b.to(torch.bfloat16), groups)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) < 1e-2  # bf16 h and output: a few units in the last bf16 place
    assert rel_err(got, y) > 0.1  # the update is not negligible here


@pytest.mark.parametrize("groups, tail_rank, rank", [([0], 32, 16), ([1, 0, 1], 16, 16), ([0, 2, 1], 32, 32)])
def test_fp8_linear_with_the_forwards_a_in_its_tail(groups, tail_rank, rank):
    """`fp8_lora_linear`: one FP8 GEMM over the weight and, after its rows, the forward's A (each group's
    `tail_rank` rows per part, of which B uses `rank`); the output is the base linear plus each item's
    update, rows `out + tail` apart, as `update` with the down-projection's own GEMM gives it."""
    from deployments.denoiser.dit.fp8_linear import Fp8Weight

    batch, seq, d_in, part_out, parts = len(groups), 4, 32, 16, 3
    n_groups = max(groups) + 1
    a, a_scale, b = factors(n_groups, parts, tail_rank, d_in, part_out, seed=5)
    a_q, a_s = layout.quantize_rows(a)
    a_s[..., rank:] = 0  # rows past B's rank count for nothing
    g = torch.Generator().manual_seed(9)
    linear = Fp8Weight.from_linear(torch.nn.Linear(d_in, parts * part_out, bias=False))
    tail = n_groups * parts * tail_rank + 16  # room to spare: a forward need not fill the tail
    extended = torch.zeros(parts * part_out + tail, d_in, dtype=torch.float8_e4m3fn)
    extended_scale = torch.zeros(1, parts * part_out + tail)
    linear.with_tail(extended, extended_scale)
    used = n_groups * parts * tail_rank
    extended[parts * part_out : parts * part_out + used] = a_q.reshape(used, d_in)
    extended_scale[0, parts * part_out : parts * part_out + used] = a_s.reshape(-1)
    x = torch.randn(batch * seq, d_in, generator=g) * 3
    x_scale = x.abs().amax(-1, keepdim=True) / 448
    x_q = (x / x_scale).to(torch.float8_e4m3fn)
    b = b[..., :rank].to(torch.bfloat16)
    slot = torch.tensor(987654)
    ops.FACTORS[987654] = ops.SlotFactors(a_q, a_s, b, torch.tensor(groups), True)
    try:
        got = ops.fp8_lora_linear(x_q, x_scale, linear.extended, linear.extended_scale, parts * part_out, slot)
    finally:
        del ops.FACTORS[987654]
    assert got.shape == (batch * seq, parts * part_out) and got.stride() == (parts * part_out + tail, 1)
    base = linear(x_q, x_scale)
    want = reference(base, x_q.float() * x_scale, a_q.float()[..., :rank, :], a_s[..., :rank], b, torch.tensor(groups))
    own_gemm = ops.update(base.clone(), x_q, x_scale, a_q[..., :rank, :], a_s[..., :rank], b, torch.tensor(groups))
    assert rel_err(got, want) < 1e-2 and rel_err(got, own_gemm) < 1e-2
    assert rel_err(got, base) > 0.1  # the update is not negligible here
    fake = ops._fp8_lora_linear_fake(x_q, x_scale, linear.extended, linear.extended_scale, parts * part_out, slot)
    assert fake.shape == got.shape and fake.stride() == got.stride()  # what inductor assumes of the real one


def test_the_op_runs_in_place_and_leaves_the_inputs():
    a, a_scale, b = factors(1, 1, 16, 8, 4, seed=1)
    x, y = torch.randn(1, 3, 8), torch.zeros(1, 3, 4)
    kept = x.clone()
    out = ops.update(y, x, None, a, a_scale, b, torch.tensor([0]))
    assert out is y and y.abs().sum() > 0 and torch.equal(x, kept)


@pytest.fixture(scope="module")
def transformer(tiny_source):
    return loading.load_transformer(tiny_source, CPU, torch.float32)


def test_layout_stacks_blocks_and_keeps_each_parts_factors(transformer):
    slots = install_lora(transformer)
    made = random_factors(transformer, rank=4, seed=1, targets=("attention.to_q", "attention.to_v"))
    laid = slots.lay_out(LoraAdapter("x", made))
    kinds = {kind.name: kind for kind in slots.kinds.values()}
    assert set(laid.kinds) == {"attention.to_q", "attention.to_v"}  # the tiny model's projections are unfused
    factors_q = laid.kinds["attention.to_q"]
    kind = kinds["attention.to_q"]
    assert factors_q.a.shape == (len(kind.blocks), 1, layout.RANK_MULTIPLE, kind.in_features)
    for block, prefix in enumerate(kind.blocks):
        a, b = made[f"{prefix}.attention.to_q"]
        assert torch.equal(factors_q.a[block, 0, :4], a) and torch.equal(factors_q.b[block, 0, :, :4], b)
        assert not factors_q.a[block, 0, 4:].any() and not factors_q.b[block, 0, :, 4:].any()


def test_a_forwards_factors_group_equal_rows_and_put_the_empty_group_first(transformer):
    slots = install_lora(transformer)
    one = slots.lay_out(LoraAdapter("one", random_factors(transformer, rank=4, seed=1)))
    two = slots.lay_out(LoraAdapter("two", random_factors(transformer, rank=20, seed=2)))
    alone = slots.plan([((one, 1.0),)])
    kind = next(iter(alone.kinds))
    assert alone.groups.tolist() == [0]
    assert alone.kinds[kind].a.data_ptr() == one.kinds[kind].a.data_ptr()  # one image, one adapter: no copy
    assert slots.plan([((one, 0.5),), ((one, 0.5),)]).groups.tolist() == [0, 0]  # one group, no empty one
    batch = slots.plan([((one, 0.5),), (), ((one, 0.5), (two, -1.0)), ((one, 0.5),)])
    assert batch.groups.tolist() == [1, 0, 2, 1]
    stacked = batch.kinds[kind]
    assert stacked.a.shape[1] == 3 and stacked.a.shape[3] == 16 + 32  # ranks 4 and 20 padded, side by side
    assert not stacked.a_scale[:, 0].any() and not stacked.b[:, 0].any()
    torch.testing.assert_close(stacked.a_scale[:, 2, :, :16], one.kinds[kind].a_scale * 0.5)
    torch.testing.assert_close(stacked.a_scale[:, 2, :, 16:], two.kinds[kind].a_scale * -1.0)


def test_graph_factors_take_any_rank_up_to_theirs_and_copy_only_new_factors(transformer):
    slots = install_lora(transformer)
    static = GraphFactors(slots, rank=32)
    small = slots.plan([((slots.lay_out(LoraAdapter("s", random_factors(transformer, rank=4, seed=1))), 2.0),)])
    large = slots.plan([((slots.lay_out(LoraAdapter("l", random_factors(transformer, rank=30, seed=2))), 1.0),)])
    too_large = slots.plan([((slots.lay_out(LoraAdapter("t", random_factors(transformer, rank=40, seed=3))), 1.0),)])
    assert static.fits(small) and static.fits(large) and not static.fits(too_large)
    kind = next(iter(static.factors.kinds))
    static.fill(large)
    assert static.factors.used_ranks[kind].tolist() == [32]
    static.fill(small)  # a smaller rank after a larger: the columns past it count for nothing
    got = static.factors.kinds[kind]
    assert not got.a_scale[..., 16:].any() and not got.b[..., 16:].any()
    assert static.factors.used_ranks[kind].tolist() == [16]  # the kernels that add the update stop there
    torch.testing.assert_close(got.a_scale[..., :16], small.kinds[kind].a_scale)
    got.b.fill_(0)
    static.fill(small)  # the same factors again: nothing copied
    assert not got.b.any()
