"""The fused FP8 path (deployments.denoiser.dit.fused_quant, fp8_attention, fp8_linear, fused_block) on the CPU.

The Triton kernels run in Triton's interpreter (`TRITON_INTERPRET=1`, CPU tensors) against their
float32 references. The interpreter's own float-to-FP8 cast truncates (it is not the GPU's
round-to-nearest), so these tests have the kernels write float32 (`FP8_DTYPE` patched): that checks
every index, mask, norm, modulation and scale exactly; the real FP8 rounding and cuDNN's FP8
attention are checked on the GPU (tests/gpu/test_gpu_fused_fp8.py). The whole fused block is checked
against diffusers' block on the tiny checkpoint with the references (FP8 numerics, bf16 attention).
"""

from __future__ import annotations

import pytest
import torch

from deployments.weights import loading
from deployments.denoiser.dit import fp8_attention, fused_block, fused_quant, fusion, rotary
from deployments.denoiser.dit.blocks import iter_blocks
from deployments.denoiser.lora import consumers, residual_consumer  # noqa: F401 - registers gated_residual_lora

CPU = torch.device("cpu")


@pytest.fixture
def interpreted(monkeypatch):
    """Triton's interpreter on CPU tensors (tests/conftest.py sets it before the kernels are defined),
    kernels writing float32 where they would write FP8."""
    if fused_quant.triton is None:
        pytest.skip("Triton is not installed")
    from triton import knobs

    if not knobs.runtime.interpret:
        pytest.skip("the kernels were defined for the GPU (TRITON_INTERPRET unset)")
    monkeypatch.setattr(fused_quant, "FP8_DTYPE", torch.float32)
    yield




def unrounded(q: torch.Tensor) -> torch.Tensor:
    return q.float()


def reference_unrounded(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = y.abs().amax(-1, keepdim=True).clamp_min(fused_quant.AMAX_FLOOR) / fused_quant.FP8_MAX
    return (y / scale).clamp(-448, 448), scale


def make(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)


def apart(rows: torch.Tensor, spare: int) -> torch.Tensor:
    """`rows` `[n, width]` as the first columns of a wider tensor (rows `width + spare` apart, the
    spare columns NaN), as an FP8 linear with LoRA rows in its tail hands its output on."""
    if not spare:
        return rows
    wide = torch.full((rows.shape[0], rows.shape[1] + spare), float("nan"), dtype=rows.dtype)
    wide[:, : rows.shape[1]] = rows
    return wide[:, : rows.shape[1]]


@pytest.mark.parametrize("n_cols", [96, 384, 640])
@pytest.mark.parametrize("with_mod", [True, False])
def test_norm_modulate_quant_kernel(interpreted, n_cols, with_mod):
    batch, seq = 3, 5
    x, w, mod = make(batch, seq, n_cols, scale=3), make(n_cols, seed=1), make(batch, n_cols, seed=2)
    q, s = torch.ops.zimage.norm_modulate_quant(x.reshape(-1, n_cols), w, mod if with_mod else None, seq, 1e-6)
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    if with_mod:
        y = y * mod.float()[:, None, :]
    want_q, want_s = reference_unrounded(y.reshape(-1, n_cols))
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=0)
    torch.testing.assert_close(unrounded(q), want_q, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fused_next, spare", [(True, 0), (False, 0), (True, 48)])
def test_gated_residual_kernel(interpreted, fused_next, spare):
    batch, seq, n_cols = 2, 4, 384
    x, y = make(batch, seq, n_cols, scale=2), make(batch, seq, n_cols, seed=1)
    w, gate, w2, mod = make(n_cols, seed=2), make(batch, n_cols, seed=3), make(n_cols, seed=4), make(batch, n_cols, seed=5)
    out, q, s = torch.ops.zimage.gated_residual(x.reshape(-1, n_cols), apart(y.reshape(-1, n_cols), spare), w, gate,
                                                seq, 1e-5, w2 if fused_next else None, mod if fused_next else None, 1e-6)
    out = out.view(batch, seq, n_cols)
    normed = y.float() * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    want = (x.float() + gate.float()[:, None, :] * normed).to(torch.bfloat16)
    # one bf16 rounding of the same float32 sum: at most one unit in the last place apart
    torch.testing.assert_close(out, want, rtol=2**-7, atol=1e-2)
    if not fused_next:
        assert q.numel() == 0 and s.numel() == 0
        return
    z = out.float() * torch.rsqrt(out.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w2.float() * mod.float()[:, None, :]
    want_q, want_s = reference_unrounded(z.reshape(-1, n_cols))
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=0)
    torch.testing.assert_close(unrounded(q), want_q, rtol=1e-4, atol=1e-3)


def test_gated_residual_without_gate_adds_the_plain_norm(interpreted):
    x, y, w = make(1, 6, 256, scale=2), make(1, 6, 256, seed=1), make(256, seed=2)
    out, _, _ = torch.ops.zimage.gated_residual(x.reshape(6, 256), y.reshape(6, 256), w, None, 6, 1e-5,
                                                None, None, 0.0)
    normed = y.float() * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    torch.testing.assert_close(out.view(1, 6, 256), (x.float() + normed).to(torch.bfloat16), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("n_cols, spare", [(160, 0), (640, 0), (160, 32)])
def test_swiglu_quant_kernel(interpreted, n_cols, spare):
    h = make(7, 2 * n_cols, scale=2)
    q, s = torch.ops.zimage.swiglu_quant(apart(h, spare))
    a, b = h.float().chunk(2, dim=-1)
    want_q, want_s = reference_unrounded(torch.nn.functional.silu(a) * b)
    torch.testing.assert_close(s, want_s, rtol=1e-5, atol=0)
    torch.testing.assert_close(unrounded(q), want_q, rtol=1e-4, atol=1e-3)


def test_a_zero_row_gets_a_finite_scale(interpreted):
    x = torch.zeros(2, 128, dtype=torch.bfloat16)
    q, s = torch.ops.zimage.norm_modulate_quant(x, torch.ones(128, dtype=torch.bfloat16), None, 2, 1e-6)
    assert torch.isfinite(s).all() and torch.isfinite(q).all() and (q == 0).all()


def test_row_split_covers_a_row_with_little_padding():
    assert fused_quant.row_split(3840) == (2048, 2048)
    assert fused_quant.row_split(10240) == (8192, 2048)
    assert fused_quant.row_split(4096) == (4096, 1)
    for n in range(1, 300):
        head, tail = fused_quant.row_split(n)
        assert head + tail >= n and head <= n and tail < 2 * max(n - head, 1)


@pytest.mark.parametrize("spare", [0, 96])
def test_qkv_norm_rope_quant_kernel(interpreted, spare):
    rows, heads, head_dim = 6, 3, 32
    qkv = make(rows, 3 * heads * head_dim, scale=2)
    wq, wk = make(head_dim, seed=1), make(head_dim, seed=2)
    angles = torch.rand(rows, head_dim // 2, generator=torch.Generator().manual_seed(3)) * 6.28
    rope = torch.stack((angles.cos(), angles.sin()), dim=-1)
    qk_descale = fp8_attention.qk_static_scales(wq, wk)
    q, k, v, v_descale = torch.ops.zimage.qkv_norm_rope_quant(apart(qkv, spare), wq, wk, rope, qk_descale, heads,
                                                              1e-5, 1e-5)
    torch.testing.assert_close(v_descale, fp8_attention.v_descale_of(qkv), rtol=1e-6, atol=0)
    want = fp8_attention.qkv_norm_rope_quant_reference(qkv, wq, wk, rope, qk_descale, v_descale, heads, 1e-5, 1e-5)
    for got, expected in zip((q, k, v), want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    # the static bound holds: nothing reaches the clamp
    assert q.abs().max() < 448 and k.abs().max() < 448


def test_qkv_reference_matches_the_stock_attention_inputs():
    """The FP8 q/k/v reference is the processor's norm + RoPE + cast, in float32."""
    rows, heads, head_dim = 5, 2, 16
    qkv = make(rows, 3 * heads * head_dim, scale=2).float()
    norm = torch.nn.RMSNorm(head_dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(make(head_dim, seed=1).float())
    angles = torch.rand(rows, head_dim // 2) * 6.28
    rope = torch.stack((angles.cos(), angles.sin()), dim=-1)
    qk_descale = fp8_attention.qk_static_scales(norm.weight, norm.weight)
    v_descale = fp8_attention.v_descale_of(qkv)
    q8, _, v8 = fp8_attention.qkv_norm_rope_quant_reference(qkv, norm.weight, norm.weight, rope, qk_descale,
                                                             v_descale, heads, 1e-5, 1e-5)
    q, _, v = qkv.reshape(rows, 3, heads, head_dim).unbind(1)
    cos, sin = rotary.rope_cos_sin(rope.unsqueeze(0))
    want_q = rotary.apply_real_rope(norm(q).unsqueeze(0), cos, sin)[0]
    assert ((q8.float() * qk_descale[0]).reshape(rows, heads, head_dim) - want_q).abs().max() <= 2**-3 * want_q.abs().max()
    assert ((v8.float() * v_descale).reshape(rows, heads, head_dim) - v).abs().max() <= 2**-3 * v.abs().max()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _sdpa_fp8_on_cpu(q, k, v, descale_q, descale_k, descale_v, heads, seq_lens=None):
    """cuDNN's FP8 attention as the tests stand it in on a CPU: the dequantized attention, cast back."""
    out = fp8_attention.sdpa_fp8_reference(q, k, v, descale_q, descale_k, descale_v, heads, seq_lens)
    return (out / descale_v).clamp(-448, 448).to(q.dtype)


@pytest.fixture
def cpu_fp8_attention(monkeypatch):
    """The fused block's FP8-attention branch on a CPU (`_sdpa_fp8_on_cpu`); counts its calls by kind."""
    taken = {"plain": 0, "padded": 0}

    def stand_in(q, k, v, descale_q, descale_k, descale_v, heads, seq_lens=None):
        taken["plain" if seq_lens is None else "padded"] += 1
        return _sdpa_fp8_on_cpu(q, k, v, descale_q, descale_k, descale_v, heads, seq_lens)

    monkeypatch.setattr(fused_block, "sdpa_fp8", stand_in)
    monkeypatch.setattr(fused_block, "cudnn_fp8_attention_available", lambda device: True)
    return taken


@pytest.mark.parametrize("attention", ["bf16", "fp8"])
@pytest.mark.parametrize("case", ["single", "ragged"])
def test_fused_block_computes_the_stock_block(tiny_source, case, attention, cpu_fp8_attention):
    """The whole fused block (FP8 GEMM inputs; bf16 attention, or FP8 attention through its CPU
    stand-in) against diffusers' block, tiny checkpoint. A ragged batch's FP8 attention takes each
    item's length from the mask: were the real tokens not a prefix, the error would be of order one."""
    reference = loading.load_transformer(tiny_source, CPU, torch.bfloat16)
    ours = loading.load_transformer(tiny_source, CPU, torch.bfloat16)
    rotary.install_real_rope(ours)
    fusion.fuse_projections(ours)
    fused_block.install_fused_blocks(ours, attention=attention)
    assert all(type(b).__name__ == "FusedFp8Block" for b in iter_blocks(ours))
    assert len({type(b) for b in iter_blocks(ours)}) == 1  # one class: one compiled graph for all blocks
    g = torch.Generator().manual_seed(0)
    # ragged: joint sequences of 288 and 192 tokens (with the 288 tokens for item two, as with a mask
    # that is not a prefix, its error was 8.6e-2)
    items = [(32, 32, 40)] if case == "single" else [(32, 32, 17), (16, 16, 100)]
    cfg = reference.config
    latents = [torch.randn(cfg.in_channels, 1, h, w, generator=g).to(torch.bfloat16) for h, w, _ in items]
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=g).to(torch.bfloat16) for *_, n in items]
    t = torch.rand(len(items), generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        want = reference(latents, t, captions, return_dict=False)[0]
        got = ours(latents, t, captions, return_dict=False)[0]
    for out, ref in zip(got, want):
        assert out.shape == ref.shape
        # FP8 (e4m3) GEMM inputs and weights: a few percent over one forward of the tiny model
        assert rel_err(out, ref) < 0.05  # measured 0.025 to 0.029
    if attention == "fp8":
        assert cpu_fp8_attention["padded" if case == "ragged" else "plain"] > 0


def test_fp8_attention_is_refused_without_cudnn_on_a_hopper(tiny_source):
    ours = loading.load_transformer(tiny_source, CPU, torch.bfloat16)
    rotary.install_real_rope(ours)
    fusion.fuse_projections(ours)
    with pytest.raises(RuntimeError, match="Hopper"):
        fused_block.install_fused_blocks(ours, attention="fp8")


def test_fused_blocks_need_fused_projections(tiny_source):
    ours = loading.load_transformer(tiny_source, CPU, torch.bfloat16)
    rotary.install_real_rope(ours)
    with pytest.raises(ValueError, match="fuse_projections"):
        fused_block.install_fused_blocks(ours, attention="bf16")


def test_fused_blocks_run_the_denoise_loops_batches(tiny_source, cpu_fp8_attention):
    """Fused blocks with the FP8-attention branch inside `DenoiseLoop` batches as serving forms them:
    ragged captions (masked, bf16 attention), equal buckets (FP8 attention with batch > 1), mixed
    sizes, eight images. The row kernels' float32 references run (the kernels themselves are checked
    above); cuDNN's FP8 attention cannot run on a CPU, so a stand-in computes it from the dequantized
    q, k, v (`sdpa_fp8_reference`)."""
    from deployments.contracts import DenoiseJob
    from deployments.denoiser.loop import DenoiseLoop

    transformer = loading.load_transformer(tiny_source, CPU, torch.bfloat16)
    rotary.install_real_rope(transformer)
    fusion.fuse_projections(transformer)
    fused_block.install_fused_blocks(transformer, attention="fp8")
    # lora=False: the blocks as `install_fused_blocks` left them (no slots, no weight tails). The fused
    # blocks do take adapters (tests/unit/test_lora_fused.py), but these jobs carry none, and a forward
    # without adapters on a model with slots is this same forward, bit for bit
    # (test_lora_fused.py::test_a_forward_without_adapters_is_the_model_without_slots).
    loop = DenoiseLoop(transformer, loading.load_scheduler(tiny_source), CPU, torch.bfloat16, batch_invariant=False,
                       lora=False)

    def job(tokens, size=128, seed=0):
        caption = torch.randn(tokens, transformer.config.cap_feat_dim, generator=torch.Generator().manual_seed(seed))
        return DenoiseJob(caption=caption.to(torch.bfloat16), width=size, height=size, steps=1, seed=seed)

    batches = {"ragged": [job(17), job(70, seed=1), job(100, seed=2)], "equal": [job(150), job(140, seed=1)],
               "mixed": [job(40), job(40, 256, seed=1)], "eight": [job(20 + 9 * i, seed=i) for i in range(8)]}
    with torch.inference_mode():
        for name, jobs in batches.items():
            results = loop.run(jobs)
            assert len(results) == len(jobs), name
            assert all(torch.isfinite(r.latents).all() for r in results), name
    assert cpu_fp8_attention["plain"] > 0 and cpu_fp8_attention["padded"] > 0  # equal and ragged batches


def _gated_residual_on_cpu(x, y, weight, gate, rows_per_item, eps, next_weight, next_mod, next_eps):
    out, q, s = fused_quant.gated_residual_reference(x, y, weight, gate, rows_per_item, eps, next_weight, next_mod,
                                                     next_eps)
    if q is None:  # the op returns empty rows then, as its fake does
        q, s = x.new_empty((0, x.shape[1]), dtype=fused_quant.FP8_DTYPE), x.new_empty((0, 1), dtype=torch.float32)
    return out, q, s


def _qkv_on_cpu(qkv, norm_q_weight, norm_k_weight, rope, qk_descale, heads, eps_q, eps_k):
    v_descale = fp8_attention.v_descale_of(qkv)
    q, k, v = fp8_attention.qkv_norm_rope_quant_reference(qkv, norm_q_weight, norm_k_weight, rope, qk_descale,
                                                          v_descale, heads, eps_q, eps_k)
    return q, k, v, v_descale


def _qkv_lora_on_cpu(extended, x, x_scale, out_features, norm_q_weight, norm_k_weight, rope, qk_descale, heads,
                     eps_q, eps_k, slot):
    qkv = consumers.updated_rows_reference(extended, x, x_scale, out_features, slot)
    return _qkv_on_cpu(qkv, norm_q_weight, norm_k_weight, rope, qk_descale, heads, eps_q, eps_k)


def _swiglu_lora_on_cpu(extended, x, x_scale, out_features, slot):
    return fused_quant.swiglu_quant_reference(consumers.updated_rows_reference(extended, x, x_scale, out_features,
                                                                              slot))


def _gated_residual_lora_on_cpu(x, extended, xq, x_scale, out_features, weight, gate, rows_per_item, eps,
                                next_weight, next_mod, next_eps, slot):
    y = consumers.updated_rows_reference(extended, xq, x_scale, out_features, slot)
    return _gated_residual_on_cpu(x, y, weight, gate, rows_per_item, eps, next_weight, next_mod, next_eps)


@pytest.fixture
def ops_as_on_a_gpu(monkeypatch):
    """The fused block calling its `torch.ops.zimage` ops, as it does on a GPU, so that torch.compile
    traces the same calls; the ops' CPU kernels are the float32 references (and a stand-in for cuDNN's
    attention), registered for this test only. What this checks is tracing and guards, not kernels."""
    if fused_quant.triton is None:
        pytest.skip("Triton is not installed (the ops are defined with the kernels)")
    library = torch.library.Library("zimage", "IMPL")
    library.impl("norm_modulate_quant", fused_quant.norm_modulate_quant_reference, "CPU")
    library.impl("gated_residual", _gated_residual_on_cpu, "CPU")
    library.impl("swiglu_quant", fused_quant.swiglu_quant_reference, "CPU")
    library.impl("qkv_norm_rope_quant", _qkv_on_cpu, "CPU")
    library.impl("qkv_norm_rope_quant_lora", _qkv_lora_on_cpu, "CPU")
    library.impl("swiglu_quant_lora", _swiglu_lora_on_cpu, "CPU")
    library.impl("gated_residual_lora", _gated_residual_lora_on_cpu, "CPU")
    library.impl("sdpa_fp8", _sdpa_fp8_on_cpu, "CPU")
    monkeypatch.setattr(fused_quant, "triton_available", lambda device: True)
    monkeypatch.setattr(fused_block, "cudnn_fp8_attention_available", lambda device: True)
    yield
    library._destroy()


def test_compiled_fused_blocks_serve_every_length_from_the_warmed_graphs(tiny_source, ops_as_on_a_gpu):
    """After the serving warm-up of one size, other image sizes, caption lengths and batches run
    without a compile. The sequence length is dynamic in the compiled block; an op argument typed
    `int` instead of `SymInt` (rows per item) or a reshape tying the RoPE table's sizes to x's made
    dynamo specialize it, so every new length compiled a graph until the recompile limit failed
    requests (an HTTP load run on an H200)."""
    from deployments.denoiser.dit import regional_compile, warmup
    from deployments.denoiser.dit.warmup import WarmupCall

    torch._dynamo.reset()
    transformer = loading.load_transformer(tiny_source, CPU, torch.bfloat16)
    rotary.install_real_rope(transformer)
    fusion.fuse_projections(transformer)
    fused_block.install_fused_blocks(transformer, attention="fp8")
    regional_compile.compile_blocks(transformer, None, backend="eager")
    single, batched = warmup.serving_calls([64], 2, 32)
    warmup.run_calls(transformer, single + batched, save=False)
    later = [(128, 64, (50,)), (64, 128, (7,)), (128, 128, (40, 40)), (64, 64, (90, 12, 33)), (128, 64, (9, 9, 9))]
    with torch.compiler.set_stance("fail_on_recompile"):
        for i, (width, height, lens) in enumerate(later):
            warmup.run_call(transformer, WarmupCall(f"later{i}", width, height, lens))
    torch._dynamo.reset()
