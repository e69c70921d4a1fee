"""The DiT speed-ups (deployments.denoiser.dit) compute what diffusers' Z-Image transformer computes (tiny checkpoint, float32, CPU).

Reference: a second copy of the same checkpoint with diffusers' own complex-RoPE processor, run in
the same process. GPU-only parts (FP8 numerics, inductor speed) are in tests/gpu/test_gpu_dit.py.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import deployments.vae.compile as vae_compile
from deployments.weights import loading
from deployments.denoiser.dit import blocks, fp8, fusion, optimize, regional_compile, rotary, warmup
from deployments.contracts import DenoiseJob
from deployments.denoiser.loop import DenoiseLoop
from deployments.vae.codec import VaeCodec

CPU = torch.device("cpu")
F32 = torch.float32
REL_TOL = 1e-5


def load(source):
    return loading.load_transformer(source, CPU, F32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(cfg, items: list[tuple[int, int, int]], seed: int = 0):
    """items: (latent height, latent width, caption length) per batch entry."""
    g = torch.Generator("cpu").manual_seed(seed)
    latents = [torch.randn(cfg.in_channels, 1, h, w, generator=g) for h, w, _ in items]
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=g) for _, _, n in items]
    t = torch.rand(len(items), generator=g)
    return latents, t, captions


@torch.inference_mode()
def forward(transformer, inputs) -> list[torch.Tensor]:
    latents, t, captions = inputs
    return transformer(latents, t, captions, return_dict=False)[0]


CASES = {
    "single": [(64, 64, 40)],
    # different sizes and caption lengths: padded image, caption and unified sequences, all masked
    "ragged": [(64, 64, 17), (48, 80, 70), (32, 32, 100)],
    # same size, caption lengths in the same 32-bucket: no mask at all
    "equal": [(64, 64, 20), (64, 64, 31)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_real_rope_matches_diffusers(tiny_source, case):
    reference, ours = load(tiny_source), load(tiny_source)
    rotary.install_real_rope(ours)
    assert isinstance(ours.rope_embedder, rotary.RealRopeEmbedder)
    assert all(isinstance(b.attention.processor, rotary.RealRopeAttnProcessor) for b in blocks.iter_blocks(ours))
    inputs = make_inputs(reference.config, CASES[case])
    for ref, out in zip(forward(reference, inputs), forward(ours, inputs)):
        assert out.shape == ref.shape
        assert rel_err(out, ref) <= REL_TOL


@pytest.mark.parametrize("case", ["single", "ragged"])
def test_fused_projections_match_diffusers(tiny_source, case):
    reference, ours = load(tiny_source), load(tiny_source)
    optimize.optimize_transformer(ours, "bf16", compile=False, fuse=True)
    block = next(blocks.iter_blocks(ours))
    assert block.attention.to_qkv is not None and not hasattr(block.attention, "to_q")
    assert isinstance(block.feed_forward, fusion.FusedFeedForward)
    inputs = make_inputs(reference.config, CASES[case], seed=1)
    for ref, out in zip(forward(reference, inputs), forward(ours, inputs)):
        assert rel_err(out, ref) <= REL_TOL


def test_processor_accepts_complex_tables(tiny_source):
    """The processor alone (diffusers' complex tables left in place) is a drop-in too."""
    reference, ours = load(tiny_source), load(tiny_source)
    processor = rotary.RealRopeAttnProcessor()
    for block in blocks.iter_blocks(ours):
        block.attention.set_processor(processor)
    inputs = make_inputs(reference.config, CASES["ragged"], seed=2)
    for ref, out in zip(forward(reference, inputs), forward(ours, inputs)):
        assert rel_err(out, ref) <= REL_TOL


@pytest.mark.parametrize("case", ["single", "equal", "ragged"])
def test_mask_only_for_ragged_batches(tiny_source, monkeypatch, case):
    """No mask reaches SDPA unless the batch is ragged (flash/cuDNN need none); then [B, 1, 1, S] bool."""
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(rotary.F, "scaled_dot_product_attention", recording_sdpa)
    transformer = optimize.optimize_transformer(load(tiny_source), compile=False)
    forward(transformer, make_inputs(transformer.config, CASES[case]))
    assert len(masks) == len(list(blocks.iter_blocks(transformer)))
    if case == "ragged":
        assert all(m is not None and m.dtype == torch.bool and m.ndim == 4 and m.shape[1:3] == (1, 1) for m in masks)
    else:
        assert all(m is None for m in masks)


def test_real_rope_equals_complex_multiplication():
    g = torch.Generator("cpu").manual_seed(3)
    x = torch.randn(2, 7, 3, 16, generator=g, dtype=torch.bfloat16)
    freqs = torch.polar(torch.ones(2, 7, 8), torch.randn(2, 7, 8, generator=g))
    expected = torch.view_as_real(
        torch.view_as_complex(x.float().reshape(2, 7, 3, 8, 2)) * freqs.unsqueeze(2)
    ).flatten(3).type_as(x)
    for table in (freqs, torch.view_as_real(freqs)):
        cos, sin = rotary.rope_cos_sin(table)
        got = rotary.apply_real_rope(x, cos, sin)
        assert got.dtype == x.dtype
        assert torch.equal(got, expected)


def _pixels(codec: VaeCodec, latents) -> list[np.ndarray]:
    return [img.pixels.numpy().astype(np.int16) for img in codec.decode(latents)]


def test_denoise_loop_images_match_plain_path(tiny_source):
    """The optimized DiT's latents after the whole loop equal the plain path's to float32 rounding
    (about 1e-7 here): the decoded pixels alone hide a real error, since a RoPE 1% off still decodes
    within 1/255 on the tiny VAE."""
    scheduler = loading.load_scheduler(tiny_source)
    codec = VaeCodec(loading.load_vae(tiny_source, CPU, F32), CPU, F32)
    plain = DenoiseLoop(load(tiny_source), scheduler, CPU, F32)
    fast = DenoiseLoop(optimize.optimize_transformer(load(tiny_source), compile=False), scheduler, CPU, F32)
    g = torch.Generator("cpu").manual_seed(4)
    jobs = [
        DenoiseJob(caption=torch.randn(23, 64, generator=g), width=512, height=512, steps=4, seed=7),
        DenoiseJob(caption=torch.randn(90, 64, generator=g), width=640, height=384, steps=4, seed=8),
    ]
    ref, ours = plain.run(jobs), fast.run(jobs)
    for a, b in zip(ours, ref):
        assert a.latents.shape == b.latents.shape and rel_err(a.latents, b.latents) <= REL_TOL
    for a, b in zip(_pixels(codec, ours), _pixels(codec, ref)):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1


def _block_inputs(cfg, seq: int, batch: int = 1, masked: bool = False):
    g = torch.Generator("cpu").manual_seed(5)
    x = torch.randn(batch, seq, cfg.dim, generator=g)
    half = sum(cfg.axes_dims) // 2
    freqs = torch.view_as_real(torch.polar(torch.ones(batch, seq, half), torch.randn(batch, seq, half, generator=g)))
    mask = None
    if masked:
        mask = torch.ones(batch, seq, dtype=torch.bool)
        mask[0, seq // 2 :] = False
    adaln = torch.randn(batch, min(cfg.dim, 256), generator=g)
    return x, mask, freqs, adaln


@pytest.mark.parametrize("masked", [False, True])
def test_block_traces_as_one_graph(tiny_source, masked):
    """fullgraph=True: a graph break (complex op, data-dependent branch) would raise here."""
    torch._dynamo.reset()
    transformer = load(tiny_source)
    optimize.optimize_transformer(transformer, compile=False)
    block = transformer.layers[0]
    inputs = _block_inputs(transformer.config, 96, batch=2 if masked else 1, masked=masked)
    with torch.inference_mode():
        expected = block(*inputs)
        got = torch.compile(block, fullgraph=True, backend="eager")(*inputs)
    assert rel_err(got, expected) <= REL_TOL
    torch._dynamo.reset()


@contextlib.contextmanager
def compiled_blocks(source, optimize_reference: bool = False):
    """(reference, ours, graphs): two loads of `source`, `ours` optimized with its blocks compiled by a
    backend that keeps each graph it is given in `graphs`; `reference` optimized alike, uncompiled, or
    left as diffusers built it. Dynamo's caches are reset on the way in and out."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    reference, ours = load(source), load(source)
    for model in (reference, ours) if optimize_reference else (ours,):
        optimize.optimize_transformer(model, compile=False)
    regional_compile.compile_blocks(ours, None, backend=counting_backend)
    try:
        yield reference, ours, graphs
    finally:
        torch._dynamo.reset()


def test_compiled_blocks_share_graphs_across_shapes(tiny_source):
    """Batch-1 requests of any size and caption length run on two graphs (modulated, plain)."""
    with compiled_blocks(tiny_source) as (reference, ours, graphs):
        cfg = reference.config
        for index, shape in enumerate([(64, 64, 17), (64, 64, 70), (48, 80, 40), (32, 32, 200)]):
            inputs = make_inputs(cfg, [shape], seed=10 + index)
            (ref,), (out,) = forward(reference, inputs), forward(ours, inputs)
            assert rel_err(out, ref) <= REL_TOL
        assert len(graphs) == 2


def test_warmup_runs_each_size(tiny_source):
    transformer = optimize.optimize_transformer(load(tiny_source), compile=False)
    timings = warmup.warmup(transformer, [512, (640, 384)], caption_len=20, batch_sizes=(1, 2))
    assert set(timings) == {
        "512x512/b1", "512x512/b2", "512x512/b2/ragged", "640x384/b1", "640x384/b2", "640x384/b2/ragged",
    }


def test_fp8_filter_picks_only_block_linears(tiny_source):
    transformer = load(tiny_source)
    picked = {name for name, mod in transformer.named_modules() if fp8.is_block_linear(mod, name)}
    n_blocks = len(list(blocks.iter_blocks(transformer)))
    assert len(picked) == 7 * n_blocks
    assert "layers.0.attention.to_out.0" in picked and "layers.1.feed_forward.w2" in picked
    assert not any("adaLN" in n or "embedder" in n or "final_layer" in n for n in picked)
    fusion.fuse_projections(transformer)
    fused = {name for name, mod in transformer.named_modules() if fp8.is_block_linear(mod, name)}
    assert len(fused) == 4 * n_blocks and "noise_refiner.0.attention.to_qkv" in fused


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_fp8_refuses_without_cuda(tiny_source):
    transformer = load(tiny_source)
    with pytest.raises(fp8.Fp8UnsupportedError, match="compute capability"):
        fp8.quantize_fp8(transformer)
    with pytest.raises(fp8.Fp8UnsupportedError, match="bf16"):
        optimize.optimize_transformer(transformer, "fp8", compile=False)
    # nothing was changed before the error
    assert not isinstance(transformer.rope_embedder, rotary.RealRopeEmbedder)


def test_rejects_unknown_options(tiny_source):
    transformer = load(tiny_source)
    with pytest.raises(ValueError, match="precision"):
        optimize.optimize_transformer(transformer, "int4", compile=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attention"):
        rotary.install_real_rope(transformer, "sparse")  # type: ignore[arg-type]


def test_vae_decoder_runs_static_graphs_for_recorded_shapes_and_one_dynamic_graph_otherwise(tiny_source):
    """The compiled decoder (backend "eager" on the CPU: dynamo's capture, no inductor) gives the
    plain decoder's pixels on both paths, and only shapes recorded during warm-up go static."""
    plain, ours = loading.load_vae(tiny_source, CPU, F32), loading.load_vae(tiny_source, CPU, F32)
    vae_compile.optimize_vae(ours, compile=True, channels_last=False, backend="eager")
    decoder = ours.decoder.forward
    assert isinstance(decoder, vae_compile.StaticOrDynamicDecoder)
    paths = []
    for name in ("_static", "_dynamic"):
        compiled = getattr(decoder, name)
        setattr(decoder, name, lambda z, *a, _c=compiled, _n=name, **k: paths.append(_n) or _c(z, *a, **k))
    g = torch.Generator("cpu").manual_seed(0)
    warm, other = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 10, generator=g)
    with torch.inference_mode():
        with decoder.recording_static():
            ours.decode(warm)
        assert decoder.static_shapes == {tuple(warm.shape)}
        for z in (warm, other):
            assert torch.allclose(ours.decode(z).sample, plain.decode(z).sample, atol=1e-5)
    assert paths == ["_static", "_static", "_dynamic"]
    assert decoder.static_shapes == {tuple(warm.shape)}


def test_the_serving_warm_up_covers_batch_one_two_and_full_and_every_caption_bucket(tiny_source):
    transformer = optimize.optimize_transformer(load(tiny_source), compile=False)
    timings = warmup.warm_for_serving(transformer, [(256, 256)], max_batch_size=4, max_caption_tokens=96)
    assert set(timings) == {
        "256x256/b1", "256x256/b1/cap32", "256x256/b1/cap64", "256x256/b1/cap96",
        "256x256/b2", "256x256/b2/ragged", "256x256/b4", "256x256/b4/ragged",
    }
