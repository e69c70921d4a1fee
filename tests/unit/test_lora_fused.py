"""LoRA adapters on the fused FP8 blocks (the path `auto` picks on an H100/H200), on the CPU: the
update's down-projection reads the FP8 rows the blocks quantized for their own GEMMs
(deployments.denoiser.lora.ops), and the up-projection of q/k/v and w1/w3 is added by the kernel after
them (deployments.denoiser.lora.consumers). The blocks' row kernels run as their float32 references
and the attention as bf16, or as FP8 through a CPU stand-in for cuDNN's (tests/gpu/test_gpu_lora.py
runs it all on a GPU; test_lora_consumers runs the kernels in Triton's interpreter).

- the fused model with adapters against diffusers' model with the same adapters merged into its
  weights, within the fused path's own error against diffusers (measured in the same test);
- a mixed batch (4 adapters at scales 1, 0.5, -0.7 and 2, and a row without) equals each row alone,
  on the fused blocks and on the dense linears; the row without adapters equals the same batch run
  without any;
- a forward without adapters on a model with slots is the model without slots, bit for bit, and its
  compiled graphs call no LoRA op.
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
from tests.unit.test_fused_fp8 import cpu_fp8_attention, ops_as_on_a_gpu  # noqa: F401 - fixtures

CPU = torch.device("cpu")
BF16 = torch.bfloat16
SCALES = (1.0, 0.5, -0.7, 2.0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fused(source, attention: str = "bf16", lora: bool = True):
    """The fused FP8 model with LoRA slots (`lora`); `attention="fp8"` needs the CPU stand-in for cuDNN's
    FP8 attention (`cpu_fp8_attention`) and takes the q/k/v kernel that adds the update itself."""
    model = loading.load_transformer(source, CPU, BF16)
    rotary.install_real_rope(model)
    fusion.fuse_projections(model)
    fused_block.install_fused_blocks(model, attention=attention)
    if lora:
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


@pytest.mark.parametrize("attention", ["bf16", "fp8"])
def test_fused_blocks_apply_adapters_as_merged_weights(tiny_source, made, attention, cpu_fp8_attention):
    reference = loading.load_transformer(tiny_source, CPU, BF16)
    merged = loading.load_transformer(tiny_source, CPU, BF16)
    with torch.no_grad():
        for factors, scale in zip(made[:2], (0.8, -0.5)):
            for path, (a, b) in factors.items():
                weight = merged.get_submodule(path).weight
                weight.copy_((weight.float() + scale * (b @ a)).to(BF16))
    ours = fused(tiny_source, attention)
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
    """(bf16 attention: FP8 attention's v scale is one for the whole batch, so a row alone and in a
    batch differ by more than the adapters' path could; the next test covers it.)"""
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


def test_the_kernels_after_the_linears_add_what_the_linears_would(tiny_source, made, cpu_fp8_attention, monkeypatch):
    """On a mixed batch (three adapters and a row without, A in the tails), the linears with the update
    added by the kernel after them (`lora.consumers`) give what each linear adding it itself gives
    (`ops.fp8_lora_linear`), row by row: each row's group, part and column are the right ones."""
    model = fused(tiny_source, "fp8")
    laid = [model._lora_slots.lay_out(LoraAdapter(f"a{i}", f)) for i, f in enumerate(made)]
    rows = [((laid[0], 1.0),), ((laid[3], -0.7),), (), ((laid[1], 0.5), (laid[2], 2.0))]
    x = inputs(model.config, len(rows), seed=4)
    ours = run(model, rows, *x)
    monkeypatch.setattr(fused_block, "qkv_norm_rope_quant_lora",
                        lambda linear, xq, xs, *norms: fused_block.qkv_norm_rope_quant(linear(xq, xs), *norms))
    monkeypatch.setattr(fused_block, "swiglu_quant_lora", lambda linear, xq, xs: fused_block.swiglu_quant(linear(xq, xs)))
    monkeypatch.setattr(fused_block, "gated_residual_lora", lambda x, linear, xq, xs, *norm, next_norm=None: (
        fused_block.gated_residual(x, linear(xq, xs).view(x.shape), *norm, next_norm=next_norm)))
    theirs = run(model, rows, *x)
    plain = run(model, [()] * len(rows), *x)
    for row, got, expected, without in zip(rows, ours, theirs, plain):
        # The linear's update is rounded to bf16 with its output, the kernels' stays float32; FP8
        # attention's one v scale for the whole batch carries such rounding to every row (even the row
        # without adapters moved 2.1e-2 between this batch and a plain one). Measured: 1.4e-2 to 2.0e-2
        # here, against 0.26 to 0.37 that the adapters change their rows by.
        assert rel_err(got, expected) <= 3e-2, rel_err(got, expected)
        if row:
            assert rel_err(got, without) > 10 * rel_err(got, expected)  # the adapters did change it


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
    own_gemms = []  # the down-projection's own GEMMs (`ops._down`), one per linear where A is not in the tail
    down = ops._down
    monkeypatch.setattr(ops, "_down", lambda *args: (own_gemms.append(1), down(*args))[1])
    in_tails = run(model, rows, *x)
    assert bool(own_gemms) == (mix == "five groups")
    own_gemms.clear()
    model._lora_slots.tail_rank = 0  # no forward fits: the down-projection's own GEMM
    own_gemm = run(model, rows, *x)
    assert own_gemms
    plain = run(model, [()] * len(rows), *x)
    for row, got, expected, without in zip(rows, in_tails, own_gemm, plain):
        # bf16 h in another summation order, then FP8 rows downstream: as a row alone vs in a batch
        assert rel_err(got, expected) <= 1e-2, rel_err(got, expected)
        if row:
            assert rel_err(got, without) > 10 * rel_err(got, expected)  # the adapters did change it


@pytest.mark.usefixtures("ops_as_on_a_gpu")
@pytest.mark.parametrize("attention", ["bf16", "fp8"])
def test_compiled_fused_blocks_take_new_adapters_without_compiling(tiny_source, made, attention):
    """After the serving warm-up with its LoRA calls, the compiled fused blocks (their ops as on a
    GPU) run new adapters, ranks, scales, mixes and batch sizes without a compile."""
    from deployments.denoiser.dit import regional_compile, warmup

    torch._dynamo.reset()
    model = fused(tiny_source, attention)
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


# the ops a fused block calls for a forward with adapters (`lora.ops`, `lora.consumers`, `lora.residual_consumer`)
LORA_OPS = ("zimage.lora_add_", "zimage.fp8_lora_linear", "zimage.qkv_norm_rope_quant_lora",
            "zimage.swiglu_quant_lora", "zimage.gated_residual_lora")


@pytest.mark.usefixtures("ops_as_on_a_gpu")
@pytest.mark.parametrize("attention", ["bf16", "fp8"])
def test_a_forward_without_adapters_is_the_model_without_slots(tiny_source, made, attention):
    """The slots move every FP8 weight into a longer buffer (its tail) and wrap the linears: a batch
    without adapters must still run exactly the plain model (`torch.equal`, compiled or not), and its
    compiled graphs must call no LoRA op, so adapters cost a plain step nothing. The same compiled
    model with an adapter does call them (the check looks for the right names)."""
    from deployments.denoiser.dit import regional_compile

    torch._dynamo.reset()
    graphs = []

    def keeping_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    plain_model = fused(tiny_source, attention, lora=False)
    with_slots = fused(tiny_source, attention)
    x = inputs(plain_model.config, 2, seed=5)
    with torch.inference_mode():
        want = plain_model(*x, return_dict=False)[0]
    eager = run(with_slots, [(), ()], *x)
    regional_compile.compile_blocks(with_slots, None, backend=keeping_backend)
    try:
        compiled = run(with_slots, [(), ()], *x)
        plain_graphs = list(graphs)
        adapter = with_slots._lora_slots.lay_out(LoraAdapter("a0", made[0]))
        run(with_slots, [((adapter, 1.0),), ()], *x)
    finally:
        torch._dynamo.reset()
    for got_eager, got_compiled, expected in zip(eager, compiled, want):
        assert torch.equal(got_eager, expected)
        assert torch.equal(got_compiled, expected)
    assert plain_graphs and not [op for gm in plain_graphs for op in LORA_OPS if op in gm.code]
    lora_graphs = graphs[len(plain_graphs):]
    assert lora_graphs and all(any(op in gm.code for op in LORA_OPS) for gm in lora_graphs)
