"""One DiT step and the 8-step loop: plain diffusers, ours in bf16 and in FP8, with each figure's
FLOP count and the floor it implies (2 x linear params x tokens + 4 x S^2 x dim attention per block)."""

from __future__ import annotations

import time
import traceback
from typing import Any

import torch

from benchmarks.harness import Bench, rel_err
from deployments.weights import loading
from deployments.contracts import DenoiseJob
from deployments.denoiser.loop import DenoiseLoop, diffusers_transformer_fn
from deployments.geometry import image_tokens, latent_shape
from deployments.denoiser.dit import fp8, optimize, regional_compile, warmup
from deployments.denoiser.dit.step_graphs import GraphedTransformerFn

BF16_PEAK = 790e12  # measured bf16 GEMM ceiling on one H200 (shared/gpu/MEASURED.md)
FP8_PEAK = 1580e12  # nominal FP8 dense
SEQ_MULTIPLE = 32
DYNAMIC = {"marked": True, "auto": None, "static": False}  # --dynamic -> compile_blocks(dynamic=...)


# ---- FLOP model


def pad_seq(n: int) -> int:
    """A sequence length as the DiT pads it."""
    return n + (-n) % SEQ_MULTIPLE


def dit_step_flops(cfg: Any, width: int, height: int, caption_tokens: int) -> dict[str, float]:
    """FLOPs of one DiT forward at batch 1, split into block linears and attention (others are <1%)."""
    dim = cfg.dim
    hidden = int(dim / 3 * 8)
    linear_params = 4 * dim * dim + 3 * dim * hidden
    s_img, s_cap = pad_seq(image_tokens(width, height)), pad_seq(caption_tokens)
    s_all = s_img + s_cap
    linear = attention = 0.0
    for seq, count in ((s_img, cfg.n_refiner_layers), (s_cap, cfg.n_refiner_layers), (s_all, cfg.n_layers)):
        linear += count * 2.0 * linear_params * seq
        attention += count * 4.0 * seq * seq * dim
    return {"linear": linear, "attention": attention, "total": linear + attention}


def floor_ms(flops: dict[str, float], fp8: bool) -> float:
    linear_peak = FP8_PEAK if fp8 else BF16_PEAK
    return 1000.0 * (flops["linear"] / linear_peak + flops["attention"] / BF16_PEAK)


# ---- inputs


def caption_embedding(tokens: int, cap_dim: int) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed(0)
    return torch.randn(tokens, cap_dim, generator=g)


def dit_step_inputs(
    cfg: Any, size: int, caption_tokens: int, device: torch.device, dtype: torch.dtype
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """One step's arguments at batch 1, the same in every benchmark: latents seeded by the size."""
    g = torch.Generator("cpu").manual_seed(size)
    latents = torch.randn(latent_shape(cfg.in_channels, size, size), generator=g)
    t = torch.tensor([0.5], device=device)
    return (
        [latents.to(device, dtype).unsqueeze(2)[0]],
        t,
        [caption_embedding(caption_tokens, cfg.cap_feat_dim).to(device, dtype)],
    )


def bench_step_inputs(bench: Bench, cfg: Any, size: int) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    return dit_step_inputs(cfg, size, bench.args.caption_tokens, bench.device, bench.dtype)


def denoise_job(bench: Bench, cfg: Any, size: int) -> DenoiseJob:
    return DenoiseJob(caption=caption_embedding(bench.args.caption_tokens, cfg.cap_feat_dim), width=size, height=size,
                      steps=bench.args.steps, seed=0)


# ---- sections


def section_dit_plain(bench: Bench, source: Any, vae: Any, state: dict[str, Any]) -> None:
    from diffusers import ZImagePipeline

    before = bench.allocated_gb()
    transformer = loading.load_transformer(source, bench.device, bench.dtype)
    state["transformer"], cfg = transformer, transformer.config
    if before is not None:
        bench.results["dit_bf16_weights_gb"] = bench.allocated_gb() - before
    for size in bench.args.dit_sizes:
        step_inputs = bench_step_inputs(bench, cfg, size)

        def step(inputs=step_inputs) -> Any:
            with torch.no_grad():  # as the pipeline runs it
                return transformer(*inputs, return_dict=False)[0]

        timing = bench.measure(step)
        flops = dit_step_flops(cfg, size, size, bench.args.caption_tokens)
        bench.row("dit_step", size, "plain_bf16_eager", timing, flops_linear=flops["linear"],
                  flops_attention=flops["attention"])
        state.setdefault("step_ref", {})[size] = step()[0].float().cpu()
        bench.write()

    scheduler = loading.load_scheduler(source)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    state["pipe"] = pipe
    for size in bench.args.full_sizes:
        caption = caption_embedding(bench.args.caption_tokens, cfg.cap_feat_dim).to(bench.device, bench.dtype)

        def run(size=size, caption=caption) -> torch.Tensor:
            return pipe(
                prompt_embeds=[caption],
                height=size,
                width=size,
                num_inference_steps=bench.args.steps,
                guidance_scale=0.0,
                output_type="latent",
                generator=torch.Generator("cpu").manual_seed(0),
            ).images

        timing = bench.measure(run, repeats=max(2, bench.repeats - 2), warmups=1)
        bench.row("dit_8steps", size, "plain_pipeline", timing)
        state.setdefault("full_ref", {})[size] = run().float().cpu()
        bench.write()


def _ours_dit(bench: Bench, source: Any, scheduler: Any, state: dict[str, Any], transformer: Any, variant: str) -> None:
    """Timings, compile time and errors of an optimized transformer (already rewritten, not yet warm)."""
    cfg = transformer.config
    compile_on = not bench.args.skip_compile
    if compile_on:
        timings = warmup.warmup(transformer, bench.args.dit_sizes, caption_len=bench.args.caption_tokens)
        first = next(iter(timings.values()))
        bench.results["compile"][variant] = {"first_call_s": first, "per_size_first_call_s": timings}
        print(f"  compile {variant}: first call {first:.1f} s, per size {timings}", flush=True)
        bench.write()
    for size in bench.args.dit_sizes:
        step_inputs = bench_step_inputs(bench, cfg, size)

        @torch.inference_mode()  # as DenoiseLoop runs it (and the mode the graphs were compiled in)
        def step(inputs=step_inputs) -> Any:
            return transformer(*inputs, return_dict=False)[0]

        timing = bench.measure(step)
        flops = dit_step_flops(cfg, size, size, bench.args.caption_tokens)
        bench.row("dit_step", size, variant, timing, flops_linear=flops["linear"], flops_attention=flops["attention"])
        ref = state.get("step_ref", {}).get(size)
        if ref is not None:
            bench.results["accuracy"][f"dit_step/{size}/{variant}"] = rel_err(step(step_inputs)[0], ref)
        bench.write()
    loop = DenoiseLoop(transformer, scheduler, bench.device, bench.dtype)
    for size in bench.args.full_sizes:
        _time_8steps(bench, state, loop, denoise_job(bench, cfg, size), variant)
    if bench.args.dit_cuda_graphs and bench.cuda:
        _graphed_dit(bench, state, transformer, scheduler, f"{variant}+graphs")


def _graphed_dit(bench: Bench, state: dict[str, Any], transformer: Any, scheduler: Any, variant: str) -> None:
    """The same step and 8 steps through `GraphedTransformerFn`, as the Denoiser runs them with
    `dit_cuda_graphs`: timed replays, and the first 8 steps at a new shape (one plain forward, one
    capture, six replays), which a request with an unseen caption length pays."""
    cfg = transformer.config
    graphed = GraphedTransformerFn.on(diffusers_transformer_fn(transformer), bench.device)
    for size in bench.args.dit_sizes:
        latents, t, captions = bench_step_inputs(bench, cfg, size)

        @torch.inference_mode()
        def step(latents=latents, t=t, captions=captions) -> Any:
            return graphed(latents, t, captions)

        bench.row("dit_step", size, variant, bench.measure(step, warmups=3))
        ref = state.get("step_ref", {}).get(size)
        if ref is not None:
            bench.results["accuracy"][f"dit_step/{size}/{variant}"] = rel_err(step()[0], ref)
        bench.write()
    loop = DenoiseLoop(transformer, scheduler, bench.device, bench.dtype, transformer_fn=graphed)
    for size in bench.args.full_sizes:
        job = denoise_job(bench, cfg, size)
        unseen = DenoiseJob(caption=job.caption[:-1], width=size, height=size, steps=job.steps, seed=job.seed)
        bench.row("dit_8steps_new_shape", size, variant, bench.measure(lambda: loop.run([unseen]), repeats=1,
                                                                        warmups=0))
        _time_8steps(bench, state, loop, job, variant)
    bench.results.setdefault("step_graphs", {})[variant] = graphed.as_dict()


def _time_8steps(bench: Bench, state: dict[str, Any], loop: DenoiseLoop, job: DenoiseJob, variant: str) -> None:
    """The loop's time for `job`, and its error against the plain pipeline's latents when known."""
    timing = bench.measure(lambda: loop.run([job]), repeats=max(2, bench.repeats - 2), warmups=1)
    bench.row("dit_8steps", job.width, variant, timing)
    ref = state.get("full_ref", {}).get(job.width)
    if ref is not None:
        bench.results["accuracy"][f"dit_8steps/{job.width}/{variant}"] = rel_err(loop.run([job])[0].latents, ref)
    bench.write()


def _optimize(bench: Bench, transformer: Any, precision: str, fp8_kernels: str = "inductor") -> None:
    """Our DiT rewrite as the benchmark's options ask, timed (compiling happens on the first call)."""
    t0 = time.perf_counter()
    optimize.optimize_transformer(
        transformer,
        precision,
        compile=not bench.args.skip_compile,
        cache_dir=bench.args.cache_dir,
        attention=bench.args.attention,
        dynamic=DYNAMIC[bench.args.dynamic],
        tune_inductor=bench.args.fp8_tune,
        backend=bench.backend,
        fp8_kernels=fp8_kernels,
    )
    bench.results["compile"][f"{fp8_variant(fp8_kernels) if precision == 'fp8' else 'ours_bf16'}_rewrite_s"] = (
        time.perf_counter() - t0
    )


def section_dit_bf16(bench: Bench, source: Any, state: dict[str, Any]) -> None:
    transformer = state["transformer"]
    _optimize(bench, transformer, "bf16")
    _ours_dit(bench, source, loading.load_scheduler(source), state, transformer, "ours_bf16")
    if not bench.args.skip_compile and not bench.args.quick and bench.remaining() > 60:
        # A restarted replica: dynamo traces again, inductor's graphs come from the on-disk cache.
        torch._dynamo.reset()
        regional_compile.compile_blocks(
            transformer,
            bench.args.cache_dir,
            dynamic=DYNAMIC[bench.args.dynamic],
            backend=bench.backend,
            artifacts_name="dit-bf16",
        )
        inputs = bench_step_inputs(bench, transformer.config, bench.args.dit_sizes[0])
        with torch.inference_mode():
            seconds = bench.first_call_s(lambda: transformer(*inputs, return_dict=False))
        bench.results["compile"]["ours_bf16_from_cache"] = {"first_call_s": seconds}
        print(f"  compile ours_bf16 again from the cache: {seconds:.1f} s", flush=True)
        bench.write()


FP8_VARIANTS = {"inductor": "ours_fp8", "fused": "ours_fp8_fused", "fused-bf16-attention": "ours_fp8_fused_bf16attn"}


def fp8_variant(fp8_kernels: str) -> str:
    return FP8_VARIANTS[fp8_kernels]


def section_dit_fp8(bench: Bench, source: Any, state: dict[str, Any]) -> None:
    """Each of `--fp8-kernels` in turn, on a freshly loaded transformer, in this one run."""
    try:
        fp8.check_fp8_support(bench.device)
    except fp8.Fp8UnsupportedError as exc:
        bench.note(f"fp8 skipped: {exc}")
        return
    for kernels in bench.args.fp8_kernels.split(","):
        try:
            _dit_fp8_variant(bench, source, state, kernels)
        except Exception as exc:  # noqa: BLE001 - the next variant still gives data
            bench.note(f"fp8 {kernels} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            traceback.print_exc()


def _dit_fp8_variant(bench: Bench, source: Any, state: dict[str, Any], kernels: str) -> None:
    variant = fp8_variant(kernels)
    state.pop("pipe", None)
    state.pop("transformer", None)
    torch._dynamo.reset()  # compiled graphs may hold the bf16 blocks alive
    bench.free()
    before = bench.allocated_gb() or 0.0
    bench.results["resident_before_fp8_gb"] = before
    if bench.cuda:
        torch.cuda.reset_peak_memory_stats(bench.device)
    transformer = loading.load_transformer(source, bench.device, bench.dtype)
    _optimize(bench, transformer, "fp8", kernels)
    bench.free()
    suffix = variant.removeprefix("ours_fp8")
    if bench.cuda:
        bench.results[f"dit_fp8{suffix}_weights_gb"] = bench.allocated_gb() - before
        bench.results[f"dit_fp8{suffix}_load_peak_gb"] = torch.cuda.max_memory_allocated(bench.device) / 2**30 - before
    state["transformer"] = transformer
    _ours_dit(bench, source, loading.load_scheduler(source), state, transformer, variant)
