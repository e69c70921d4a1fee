"""LoRA adapters on the fused FP8 blocks (the path `auto` picks on an H100/H200), on the CPU: the
update's down-projection reads the FP8 rows the blocks quantized for their own GEMMs
(deployments.denoiser.lora.ops). The blocks' row kernels run as their float32 references and the
attention as bf16 (the FP8 attention needs cuDNN: tests/gpu/test_gpu_lora.py runs it all on a GPU).

- the fused model with adapters against diffusers' model with the same adapters merged into its
  weights, within the fused path's own error against diffusers (measured in the same test);
- a mixed batch (4 adapters at scales 1, 0.5, -0.7 and 2, and a row without) equals each row alone,
  on the fused blocks and on the dense linears; the row without adapters equals the same batch run
  without any.
"""

from __future__ import annotations

import pytest
import torch

from deployments.denoiser.dit import fused_block, fusion, rotary
from deployments.denoiser.dit.optimize import optimize_transformer
from deployments.denoiser.lora.adapter import LoraAdapter
from deployments.denoiser.lora.slots import install_lora
from deployments.weights import loading
from deployments.denoiser.lora.random_adapters import random_factors

CPU = torch.device("cpu")
BF16 = torch.bfloat16
SCALES = (1.0, 0.5, -0.7, 2.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fused(source):
    model = loading.load_transformer(source, CPU, BF16)
    rotary.install_real_rope(model)
    fusion.fuse_projections(model)
    fused_block.install_fused_blocks(model, attention="bf16")
    install_lora(model)
    return model


def inputs(cfg, batch: int, seed: int = 0):
    """`batch` images of one size and caption length (no mask: each row's own attention, alone or not)."""
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(cfg.in_channels, 1, 32, 32, generator=g).to(BF16) for _ in range(batch)]
    captions = [torch.randn(40, cfg.cap_feat_dim, generator=g).to(BF16) for _ in range(batch)]
    return latents, (torch.rand(batch, generator=g) * 0.8 + 0.1).to(BF16), captions


@torch.inference_mode()
def run(model, rows, latents, t, captions):
    with model._lora_slots.using(rows):
        return model(latents, t, captions, return_dict=False)[0]


@pytest.fixture(scope="module")
def made(tiny_source):
    """Four random adapters' factors (ranks 4 to 32, one on the attention only), by unfused module."""
    model = loading.load_transformer(tiny_source, CPU, torch.float32)
    targets = [None, None, ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"), None]
    return [random_factors(model, rank, seed=i, strength=0.3, **({"targets": t} if t else {}))
            for i, (rank, t) in enumerate(zip((4, 8, 16, 32), targets))]


def test_fused_blocks_apply_adapters_as_merged_weights(tiny_source, made):
    reference = loading.load_transformer(tiny_source, CPU, BF16)
    merged = loading.load_transformer(tiny_source, CPU, BF16)
    with torch.no_grad():
        for factors, scale in zip(made[:2], (0.8, -0.5)):
            for path, (a, b) in factors.items():
                weight = merged.get_submodule(path).weight
                weight.copy_((weight.float() + scale * (b @ a)).to(BF16))
    ours = fused(tiny_source)
    adapters = tuple((ours._lora_slots.lay_out(LoraAdapter(f"a{i}", f)), s) for i, (f, s) in
                     enumerate(zip(made[:2], (0.8, -0.5))))
    x = inputs(ours.config, 1)
    with torch.inference_mode():
        (plain_ref,) = reference(*x, return_dict=False)[0]
        (merged_ref,) = merged(*x, return_dict=False)[0]
    (plain,) = run(ours, [()], *x)
    (with_lora,) = run(ours, [adapters], *x)
    plain_err, lora_err = rel_err(plain, plain_ref), rel_err(with_lora, merged_ref)
    assert rel_err(merged_ref, plain_ref) > 0.1  # the adapters change the output
    assert lora_err <= 1.5 * plain_err, (lora_err, plain_err)  # measured 0.034 and 0.029


@pytest.mark.parametrize("family", ["fused", "dense"])
def test_a_mixed_batch_equals_each_row_alone(tiny_source, made, family):
    if family == "fused":
        model = fused(tiny_source)
        tolerance = 1e-2  # bf16 outputs; CPU GEMMs sum in another order for another row count
    else:
        model = optimize_transformer(loading.load_transformer(tiny_source, CPU, torch.float32), compile=False)
        tolerance = 1e-5
    dtype = model.x_pad_token.dtype
    laid = [model._lora_slots.lay_out(LoraAdapter(f"a{i}", f)) for i, f in enumerate(made)]
    rows = [((adapter, scale),) for adapter, scale in zip(laid, SCALES)] + [()]
    latents, t, captions = inputs(model.config, len(rows), seed=1)
    latents, t, captions = [x.to(dtype) for x in latents], t.to(dtype), [c.to(dtype) for c in captions]
    batch = run(model, rows, latents, t, captions)
    plain_batch = run(model, [()] * len(rows), latents, t, captions)
    for i, row in enumerate(rows):
        (alone,) = run(model, [row], latents[i : i + 1], t[i : i + 1], captions[i : i + 1])
        assert rel_err(batch[i], alone) <= tolerance, (i, rel_err(batch[i], alone))
        if row:
            assert rel_err(batch[i], plain_batch[i]) > 10 * tolerance  # the row's adapter did change it
    assert torch.equal(batch[-1], plain_batch[-1])  # zero factors add exactly nothing


@pytest.mark.parametrize("mix", ["one image", "four adapters on four rows", "five groups"])
def test_the_tails_down_projection_equals_its_own_gemm(tiny_source, made, mix, monkeypatch):
    """A forward's A in the FP8 weights' tails (the down-projection as the base GEMM's last columns)
    gives what the down-projection as a GEMM of its own gives; where the groups times rank need more
    rows than a tail holds (five groups of rank 32), the forward takes that GEMM."""
    from deployments.denoiser.lora import ops

    model = fused(tiny_source)
    laid = [model._lora_slots.lay_out(LoraAdapter(f"a{i}", f)) for i, f in enumerate(made)]
    rows = {"one image": [((laid[3], 0.7),)],
            "four adapters on four rows": [((adapter, scale),) for adapter, scale in zip(laid, SCALES)],
            "five groups": [((adapter, scale),) for adapter, scale in zip(laid, SCALES)] + [()]}[mix]
    x = inputs(model.config, len(rows), seed=3)
    taken = []
    update = ops.update
    monkeypatch.setattr(ops, "update", lambda *args, h=None: (taken.append(h is not None), update(*args, h=h))[1])
    in_tails = run(model, rows, *x)
    assert taken and all(in_tail == (mix != "five groups") for in_tail in taken)
    taken.clear()
    model._lora_slots.tail_rank = 0  # no forward fits: the down-projection's own GEMM
    own_gemm = run(model, rows, *x)
    assert taken and not any(taken)
    plain = run(model, [()] * len(rows), *x)
    for row, got, expected, without in zip(rows, in_tails, own_gemm, plain):
        # bf16 h in another summation order, then FP8 rows downstream: as a row alone vs in a batch
        assert rel_err(got, expected) <= 1e-2, rel_err(got, expected)
        if row:
            assert rel_err(got, without) > 10 * rel_err(got, expected)  # the adapters did change it


from tests.unit.test_fused_fp8 import ops_as_on_a_gpu  # noqa: E402,F401 - a fixture


@pytest.mark.usefixtures("ops_as_on_a_gpu")
def test_compiled_fused_blocks_take_new_adapters_without_compiling(tiny_source, made):
    """After the serving warm-up with its LoRA calls, the compiled fused blocks (their ops as on a
    GPU) run new adapters, ranks, scales, mixes and batch sizes without a compile."""
    from deployments.denoiser.dit import regional_compile, warmup

    torch._dynamo.reset()
    model = fused(tiny_source)
    regional_compile.compile_blocks(model, None, backend="eager")
    single, batched = warmup.serving_calls([64], 3, 32, lora=True)
    warmup.run_calls(model, single + batched, save=False)
    laid = [model._lora_slots.lay_out(LoraAdapter(f"a{i}", f)) for i, f in enumerate(made)]
    mixes = [[((laid[0], 1.0),)], [((laid[3], -0.7),), ()], [(), ((laid[1], 0.5), (laid[2], 2.0)), ((laid[0], 1.0),)],
             [((laid[2], 1.0),)] * 2]
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            for i, rows in enumerate(mixes):
                latents, t, captions = inputs(model.config, len(rows), seed=10 + i)
                outputs = run(model, rows, latents, t, captions)
                assert all(torch.isfinite(out).all() for out in outputs)
    finally:
        torch._dynamo.reset()
