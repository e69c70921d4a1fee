"""The ControlNet's blocks on the DiT's fused FP8 path (deployments.denoiser.control_blocks), on the
CPU: the blocks' row kernels run as their float32 references and the attention as bf16 (or the FP8
attention through the CPU stand-in of tests/unit/test_fused_fp8.py); tests/gpu/test_gpu_controlnet.py
runs it all on a GPU. Tiny checkpoint, tiny Union 2.x ControlNet.

- a control block on the fused path against diffusers' `ZImageControlTransformerBlock` (complex RoPE,
  bf16), one image and a ragged batch; the controlled forward against diffusers' bf16 ControlNet and
  DiT, within 1.5x of the plain fused forward's own error against diffusers' plain forward;
- compiled (its ops as on a GPU; the fused FP8 blocks, and dense linears carrying adapters), after
  the serving warm-up with the ControlNet's calls, controlled forwards at new sizes, caption lengths,
  scales, in the inpainting layout, with adapters and in mixed batches compile nothing;
- a mixed batch (controlled, plain, with LoRA, both) equals each row alone, on the fused blocks and
  on the dense linears; its plain row equals the same batch with no control and no adapters.
"""

from __future__ import annotations

import copy

import pytest
import torch

from deployments.denoiser.control import ControlContext, ControlNetRunner, control_context
from deployments.denoiser.dit import fused_block, fusion, rotary
from deployments.denoiser.dit.blocks import iter_blocks
from deployments.denoiser.lora.adapter import LoraAdapter
from deployments.denoiser.lora.random_adapters import random_factors
from deployments.denoiser.lora.slots import install_lora
from deployments.weights import loading
from deployments.weights.controlnet_source import TINY_CONTROLNET_CONFIG, build_tiny_controlnet
from tests.unit.test_controlnet_forward import diffusers_forward, rel_err
from tests.unit.test_fused_fp8 import cpu_fp8_attention, ops_as_on_a_gpu  # noqa: F401 - fixtures

CPU, BF16 = torch.device("cpu"), torch.bfloat16


def fused_dit(source, attention: str = "bf16", lora: bool = False):
    model = loading.load_transformer(source, CPU, BF16)
    rotary.install_real_rope(model)
    fusion.fuse_projections(model)
    fused_block.install_fused_blocks(model, attention=attention)
    if lora:
        install_lora(model)
    return model


def tiny_controlnet(dtype=BF16):
    return build_tiny_controlnet(TINY_CONTROLNET_CONFIG).to(dtype).eval().requires_grad_(False)


def make_controls(runner, shapes, scales, seed=0, mask=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for (h, w), scale in zip(shapes, scales):
        if scale is None:
            out.append(None)
            continue
        keep = (torch.rand(1, 1, h, w, generator=g) > 0.5).float() if mask else None
        masked = torch.randn(1, 16, h, w, generator=g) if mask else None
        out.append(ControlContext(control_context(torch.randn(1, 16, h, w, generator=g), runner.in_dim, keep, masked),
                                  scale))
    return out


def inputs(cfg, items, dtype=BF16, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(cfg.in_channels, 1, h, w, generator=g).to(dtype) for h, w, _ in items]
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=g).to(dtype) for *_, n in items]
    return latents, (torch.rand(len(items), generator=g) * 0.8 + 0.1).to(dtype), captions


@pytest.mark.parametrize("case", ["single", "ragged"])
def test_a_fused_control_block_computes_diffusers_control_block(tiny_source, case):
    from diffusers.models.transformers.transformer_z_image import RopeEmbedder

    dit = fused_dit(tiny_source)
    stock = tiny_controlnet()
    reference = copy.deepcopy(stock)
    ControlNetRunner(stock, dit)
    assert {type(b) for b in stock.control_layers} | {type(b) for b in stock.control_noise_refiner} == {
        type(dit.layers[0])}  # the DiT's fused class: its compiled graphs too
    cfg, dim = dit.config, dit.config.dim
    g = torch.Generator().manual_seed(1)
    lengths = [64] if case == "single" else [64, 40]
    ids = torch.stack([torch.zeros(64, dtype=torch.int32), torch.arange(64, dtype=torch.int32) // 8,
                       torch.arange(64, dtype=torch.int32) % 8], dim=-1)
    complex_freqs = RopeEmbedder(cfg.rope_theta, cfg.axes_dims, cfg.axes_lens)(ids).expand(len(lengths), -1, -1)
    real_freqs = dit.rope_embedder(ids).expand(len(lengths), -1, -1, -1)
    mask = None if case == "single" else torch.arange(64)[None, :] < torch.tensor(lengths)[:, None]
    c, x = torch.randn(2, len(lengths), 64, dim, generator=g).to(BF16)
    adaln = torch.randn(len(lengths), min(dim, 256), generator=g).to(BF16)
    with torch.inference_mode():
        for ours, theirs in zip(stock.control_layers, reference.control_layers):
            stacked = c if theirs.block_id == 0 else c.unsqueeze(0)  # later blocks take the stack of hints
            want_skip, want_c = theirs(stacked, x, mask, complex_freqs, adaln)[-2:]
            start = ours.before_proj(c) + x if ours.block_id == 0 else c
            got_c = ours(start, mask, real_freqs, adaln)
            got_skip = ours.after_proj(got_c)
            for got, want in ((got_c, want_c), (got_skip, want_skip)):
                valid = slice(None) if mask is None else mask
                # FP8 (e4m3) GEMM inputs and weights, as the fused DiT block's own error (test_fused_fp8)
                assert rel_err(got[valid], want[valid]) < 0.05, (ours.block_id, rel_err(got[valid], want[valid]))
            c = want_c


def test_the_fused_controlled_forward_errs_as_the_plain_one(tiny_source):
    dit, stock_dit = fused_dit(tiny_source), loading.load_transformer(tiny_source, CPU, BF16)
    stock = tiny_controlnet()
    from diffusers import ZImageControlNetModel

    reference = ZImageControlNetModel.from_transformer(copy.deepcopy(stock), stock_dit)
    runner = ControlNetRunner(stock, dit)
    latents, t, captions = inputs(dit.config, [(32, 32, 40)])
    controls = make_controls(runner, [(32, 32)], [0.75])
    want = diffusers_forward(reference, stock_dit, latents, t, captions, controls)[0]
    got = runner.forward(latents, t, captions, controls)[0]
    with torch.inference_mode():
        plain_want = stock_dit(latents, t, captions, return_dict=False)[0][0]
        plain_got = dit(latents, t, captions, return_dict=False)[0][0]
    err, plain_err = rel_err(got, want), rel_err(plain_got, plain_want)
    assert rel_err(want, plain_want) > 5 * err  # the control moves the output well past the path's error
    assert err <= 1.5 * plain_err, (err, plain_err)


@pytest.mark.usefixtures("ops_as_on_a_gpu")
@pytest.mark.parametrize("family", ["fused", "dense"])
def test_compiled_controlled_forwards_after_the_warmup_compile_nothing(tiny_source, family):
    """The serving warm-up (plain and LoRA calls, one size) compiles every graph the ControlNet's own
    warm-up calls then run (the control blocks run the DiT's graphs: on the fused FP8 blocks, and on
    dense linears carrying adapters as the DiT's do); after those, new sizes, caption lengths, scales,
    the inpainting layout, adapters and mixed batches run without a compile."""
    from deployments.denoiser.control_warmup import serving_control_calls
    from deployments.denoiser.dit import regional_compile, warmup

    torch._dynamo.reset()
    if family == "fused":
        dit = fused_dit(tiny_source, attention="fp8", lora=True)
    else:
        dit = loading.load_transformer(tiny_source, CPU, BF16)
        rotary.install_real_rope(dit)
        fusion.fuse_projections(dit)
        install_lora(dit)
    regional_compile.compile_blocks(dit, None, backend="eager")
    runner = ControlNetRunner(tiny_controlnet(), dit)
    single, batched = warmup.serving_calls([64], 3, 32, lora=True)
    before, with_batches, with_shapes = serving_control_calls(single, batched, runner.takes_mask, [(128, 64)])
    warmup.run_calls(dit, single + batched, save=False)
    assert {type(b.attention.to_out[0]) for b in runner.controlnet.control_layers} == {type(dit.layers[0].attention.to_out[0])}
    with torch.compiler.set_stance("fail_on_recompile"):
        warmup.run_calls(dit, before + with_batches + with_shapes, save=False, control=runner)
    adapter = dit._lora_slots.lay_out(LoraAdapter("ink", random_factors(dit, 4, seed=2, strength=0.3)))
    later = [  # (latent h, w, caption) per row, scales (None: uncontrolled), the inpainting layout, adapters per row
        ([(16, 8, 50)], [0.3], False, [()]),
        ([(8, 16, 7)], [1.7], True, [()]),
        ([(8, 8, 90)], [0.5], False, [((adapter, 1.0),)]),
        ([(16, 16, 40), (16, 16, 40)], [0.8, None], False, [(), ((adapter, -0.5),)]),
        ([(8, 8, 90), (16, 8, 12), (8, 16, 33)], [None, 1.1, 0.6], True, [((adapter, 1.0),), (), ()]),
    ]
    try:
        with torch.compiler.set_stance("fail_on_recompile"), torch.inference_mode():
            for items, scales, mask, adapters in later:
                latents, t, captions = inputs(dit.config, items, seed=len(items))
                controls = make_controls(runner, [x[:2] for x in items], scales, mask=mask)
                with dit._lora_slots.using(adapters):
                    outputs = runner.forward(latents, t, captions, controls)
                assert all(torch.isfinite(out).all() for out in outputs)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("family", ["fused", "dense"])
def test_a_mixed_batch_equals_each_row_alone(tiny_source, family):
    if family == "fused":  # bf16 attention: FP8 attention's v scale is the batch's (tests/gpu)
        dit, dtype, tolerance = fused_dit(tiny_source, lora=True), BF16, 1e-2
    else:
        dit, dtype, tolerance = loading.load_transformer(tiny_source, CPU, torch.float32), torch.float32, 1e-5
        install_lora(dit)
    runner = ControlNetRunner(tiny_controlnet(dtype), dit)
    adapter = dit._lora_slots.lay_out(LoraAdapter("ink", random_factors(dit, 4, seed=3, strength=0.3)))
    items = [(16, 16, 20), (16, 16, 20), (16, 24, 50), (24, 16, 9)]
    latents, t, captions = inputs(dit.config, items, dtype, seed=4)
    controls = make_controls(runner, [x[:2] for x in items], [0.7, None, None, 1.2], mask=True)
    adapters = [(), (), ((adapter, 0.8),), ((adapter, -0.6),)]

    def run(rows):
        with dit._lora_slots.using([adapters[i] for i in rows]):
            return runner.forward([latents[i] for i in rows], t[rows], [captions[i] for i in rows],
                                  [controls[i] for i in rows])

    batch = run([0, 1, 2, 3])
    with torch.inference_mode():
        plain_batch = dit(latents, t, captions, return_dict=False)[0]
    for i in range(4):
        (alone,) = run([i])
        assert rel_err(batch[i], alone) <= tolerance, (i, rel_err(batch[i], alone))
        if i != 1:
            assert rel_err(batch[i], plain_batch[i]) > 10 * tolerance  # its control or adapter acted
    assert torch.equal(batch[1], plain_batch[1])  # nothing of its neighbours' reaches the plain row
    assert all(type(b) is type(dit.layers[0]) for b in runner.controlnet.control_layers)
    assert len({type(b) for b in iter_blocks(dit)}) == 1
