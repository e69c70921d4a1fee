"""Stage benchmark: plain diffusers against our path, per stage and per image, in one run on one device.

    python benchmarks/bench_stages.py --json bench.json                 # H200, model `random`
    python benchmarks/bench_stages.py --quick --sizes 512,1024 --skip-fp8
    python benchmarks/bench_stages.py --device cpu --model tiny --quick --sizes 512   # smoke run

What is compared (median of N timed runs after warm-up, CUDA events, batch 1):
- text encoder, one ~256-token prompt: plain = the full Qwen3 model with `output_hidden_states`, padded
  to 512 tokens as diffusers' `ZImagePipeline._encode_prompt` does; ours = the encoder cut after the
  layer Z-Image reads, at the prompt's own length (`PromptEncoder`), then optionally compiled;
- one DiT step: diffusers' eager bf16 transformer; ours bf16 (real RoPE, fused projections,
  regional compile) and FP8 rowwise (the same, with torchao FP8 linears);
- 8 steps: `ZImagePipeline` with the embedding given and `output_type="latent"`; ours `DenoiseLoop`;
- VAE decode: `vae.decode` as the pipeline calls it; ours channels-last, optionally compiled, tiled
  above 1024x1024 (`VaeCodec`'s rule);
- per image in total: text + 8 steps + decode.
Also: the SDPA backends alone at the 1024x1024 sequence length, peak GPU memory per stage
(`max_memory_allocated` after a reset; `extra_gb` is the peak above what was resident before),
cold compile times, the relative error of each of our variants against plain, and for each DiT
figure its distance from the FLOP floor (2 x linear params x tokens + 4 x S^2 x dim attention per
block; bf16 at the measured 790 TFLOP/s, FP8 linears at the nominal 1580); "% floor" in the table
is floor / measured, 100% meaning at the floor. "plain/ours" above 1 means ours is faster.

Sections run from most to least important for the DiT and write the JSON after each, so that a
run cut short still leaves its data. `--budget-s` skips what would not fit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.run_info import commit  # noqa: E402
from deployments.core import compile_cache, text_encoder_compile, vae_compile, loading  # noqa: E402
from deployments.core.dit import fp8, optimize, regional_compile, rotary, warmup  # noqa: E402
from deployments.core.contracts import DenoiseJob  # noqa: E402
from deployments.core.denoising import DenoiseLoop, image_tokens, latent_shape  # noqa: E402
from deployments.core.model_source import resolve_model_source  # noqa: E402

BF16_PEAK = 790e12  # measured bf16 GEMM ceiling on one H200 (shared/gpu/MEASURED.md)
FP8_PEAK = 1580e12  # nominal FP8 dense
SEQ_MULTIPLE = 32
DYNAMIC = {"marked": True, "auto": None, "static": False}  # --dynamic -> compile_blocks(dynamic=...)


# --------------------------------------------------------------------------------------------------
# FLOP model
# --------------------------------------------------------------------------------------------------


def _pad(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


def dit_step_flops(cfg: Any, width: int, height: int, caption_tokens: int) -> dict[str, float]:
    """FLOPs of one DiT forward at batch 1, split into block linears and attention (others are <1%)."""
    dim = cfg.dim
    hidden = int(dim / 3 * 8)
    linear_params = 4 * dim * dim + 3 * dim * hidden
    s_img, s_cap = _pad(image_tokens(width, height)), _pad(caption_tokens)
    s_all = s_img + s_cap
    linear = attention = 0.0
    for seq, count in ((s_img, cfg.n_refiner_layers), (s_cap, cfg.n_refiner_layers), (s_all, cfg.n_layers)):
        linear += count * 2.0 * linear_params * seq
        attention += count * 4.0 * seq * seq * dim
    return {"linear": linear, "attention": attention, "total": linear + attention}


def floor_ms(flops: dict[str, float], fp8: bool) -> float:
    linear_peak = FP8_PEAK if fp8 else BF16_PEAK
    return 1000.0 * (flops["linear"] / linear_peak + flops["attention"] / BF16_PEAK)


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.started = time.perf_counter()
        self.repeats = args.repeats or (3 if args.quick else 5)
        self.warmups = 1 if args.quick else 2
        self.backend = args.compile_backend or ("inductor" if self.cuda else "eager")
        self.results: dict[str, Any] = {"meta": self.meta(), "rows": [], "compile": {}, "accuracy": {}, "notes": []}

    # ---- bookkeeping

    def meta(self) -> dict[str, Any]:
        args = self.args
        meta: dict[str, Any] = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
            "model": args.model,
            "dtype": str(self.dtype).removeprefix("torch."),
            "args": vars(args),
        }
        if self.cuda:
            meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability(self.device)))
        for name in ("diffusers", "torchao", "transformers"):
            try:
                meta[name] = __import__(name).__version__
            except Exception:  # noqa: BLE001 - optional on the CPU smoke run
                meta[name] = None
        return meta

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.args.budget_s - self.elapsed()

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.results["notes"].append(text)

    def write(self) -> None:
        self.results["summary"] = summarize(self.results)
        self.results["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        if self.args.json:
            path = Path(self.args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.results, indent=2, default=str))
            tmp.replace(path)

    def row(self, stage: str, size: int | None, variant: str, timing: dict[str, Any], **extra: Any) -> None:
        entry = {"stage": stage, "size": size, "variant": variant, **timing, **extra}
        self.results["rows"].append(entry)
        peak = f", peak {timing['peak_gb']:.2f} GB (+{timing['extra_gb']:.2f})" if timing.get("peak_gb") else ""
        print(f"  {stage:<13} {size or '':>5} {variant:<26} {timing['median_ms']:10.2f} ms{peak}", flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def allocated_gb(self) -> float | None:
        return torch.cuda.memory_allocated(self.device) / 2**30 if self.cuda else None

    def measure(self, fn: Callable[[], Any], repeats: int | None = None, warmups: int | None = None) -> dict[str, Any]:
        """Median wall time of `fn` after warm-up, with the peak memory over the timed runs."""
        for _ in range(self.warmups if warmups is None else warmups):
            fn()
        self.sync()
        base = None
        if self.cuda:
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(repeats or self.repeats):
            if self.cuda:
                times.append(cuda_time_ms(fn))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000.0)
        out: dict[str, Any] = {
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "runs": len(times),
        }
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            out.update(resident_gb=base / 2**30, peak_gb=peak / 2**30, extra_gb=(peak - base) / 2**30)
        return out

    def first_call_s(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    # ---- inputs

    def caption(self, cap_dim: int) -> torch.Tensor:
        g = torch.Generator("cpu").manual_seed(0)
        return torch.randn(self.args.caption_tokens, cap_dim, generator=g)

    def step_inputs(self, cfg: Any, size: int) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        g = torch.Generator("cpu").manual_seed(size)
        latents = torch.randn(latent_shape(cfg.in_channels, size, size), generator=g)
        caption = self.caption(cfg.cap_feat_dim)
        t = torch.tensor([0.5], device=self.device)
        return (
            [latents.to(self.device, self.dtype).unsqueeze(2)[0]],
            t,
            [caption.to(self.device, self.dtype)],
        )

    def job(self, cfg: Any, size: int) -> DenoiseJob:
        return DenoiseJob(caption=self.caption(cfg.cap_feat_dim), width=size, height=size, steps=self.args.steps, seed=0)


def cuda_time_ms(fn: Callable[[], Any]) -> float:
    """GPU time of one call of `fn`, between CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def section_attention(bench: Bench, cfg: Any) -> None:
    """SDPA alone at the 1024x1024 unified length: how much each backend leaves on the table."""
    if not bench.cuda:
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seq = _pad(image_tokens(1024, 1024)) + _pad(bench.args.caption_tokens)
    heads, head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
    g = torch.Generator(bench.device).manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, seq, head_dim, generator=g, device=bench.device, dtype=bench.dtype) for _ in range(3)
    )
    flops = 4.0 * seq * seq * head_dim * heads
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]), torch.inference_mode():
                timing = bench.measure(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), repeats=10)
        except RuntimeError as exc:
            bench.note(f"SDPA {backend.name}: unavailable ({str(exc).splitlines()[0][:120]})")
            continue
        timing["tflops"] = flops / (timing["median_ms"] / 1000) / 1e12
        out[backend.name] = timing
        bench.row("attention", 1024, backend.name.lower(), timing, tflops=round(timing["tflops"], 1))
    bench.results["attention_per_layer"] = {"seq": seq, "flops": flops, "backends": out}
    del q, k, v
    bench.free()


def section_dit_plain(bench: Bench, source: Any, vae: Any, state: dict[str, Any]) -> None:
    from diffusers import ZImagePipeline

    before = bench.allocated_gb()
    transformer = loading.load_transformer(source, bench.device, bench.dtype)
    state["transformer"], cfg = transformer, transformer.config
    if before is not None:
        bench.results["dit_bf16_weights_gb"] = bench.allocated_gb() - before
    for size in bench.args.dit_sizes:
        step_inputs = bench.step_inputs(cfg, size)

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
        caption = bench.caption(cfg.cap_feat_dim).to(bench.device, bench.dtype)

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
        step_inputs = bench.step_inputs(cfg, size)

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
        job = bench.job(cfg, size)
        timing = bench.measure(lambda job=job: loop.run([job]), repeats=max(2, bench.repeats - 2), warmups=1)
        bench.row("dit_8steps", size, variant, timing)
        ref = state.get("full_ref", {}).get(size)
        if ref is not None:
            bench.results["accuracy"][f"dit_8steps/{size}/{variant}"] = rel_err(loop.run([job])[0].latents, ref)
        bench.write()


def _optimize(bench: Bench, transformer: Any, precision: str) -> None:
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
    )
    bench.results["compile"][f"ours_{precision}_rewrite_s"] = time.perf_counter() - t0


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
        inputs = bench.step_inputs(transformer.config, bench.args.dit_sizes[0])
        with torch.inference_mode():
            seconds = bench.first_call_s(lambda: transformer(*inputs, return_dict=False))
        bench.results["compile"]["ours_bf16_from_cache"] = {"first_call_s": seconds}
        print(f"  compile ours_bf16 again from the cache: {seconds:.1f} s", flush=True)
        bench.write()


def section_dit_fp8(bench: Bench, source: Any, state: dict[str, Any]) -> None:
    try:
        fp8.check_fp8_support(bench.device)
    except fp8.Fp8UnsupportedError as exc:
        bench.note(f"fp8 skipped: {exc}")
        return
    state.pop("pipe", None)
    state.pop("transformer", None)
    torch._dynamo.reset()  # compiled graphs may hold the bf16 blocks alive
    bench.free()
    before = bench.allocated_gb() or 0.0
    bench.results["resident_before_fp8_gb"] = before
    if bench.cuda:
        torch.cuda.reset_peak_memory_stats(bench.device)
    transformer = loading.load_transformer(source, bench.device, bench.dtype)
    _optimize(bench, transformer, "fp8")
    bench.free()
    if bench.cuda:
        bench.results["dit_fp8_weights_gb"] = bench.allocated_gb() - before
        bench.results["dit_fp8_load_peak_gb"] = torch.cuda.max_memory_allocated(bench.device) / 2**30 - before
    state["transformer"] = transformer
    _ours_dit(bench, source, loading.load_scheduler(source), state, transformer, "ours_fp8")


def _vae_inputs(bench: Bench, vae: Any) -> tuple[Any, dict[int, torch.Tensor]]:
    from deployments.core.vae_codec import VaeCodec

    codec = VaeCodec(vae, bench.device, bench.dtype, tile_px=bench.args.vae_tile_px,
                     tile_overlap=bench.args.vae_tile_overlap)
    latents = {}
    for size in bench.args.sizes:
        g = torch.Generator("cpu").manual_seed(size)
        z = torch.randn(latent_shape(vae.config.latent_channels, size, size), generator=g)
        latents[size] = (z / codec.scaling_factor + codec.shift_factor).to(bench.device, bench.dtype)
    return codec, latents


def _vae_ours(vae: Any, codec: Any, size: int, z: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return (vae.tiled_decode(z) if codec.needs_tiling(size, size) else vae.decode(z)).sample


def section_vae(bench: Bench, vae: Any) -> None:
    """Plain `vae.decode` (untiled, as the pipeline; tiled too above 1024x1024), then ours channels-last."""
    codec, latents = _vae_inputs(bench, vae)
    for size, z in latents.items():
        try:
            with torch.inference_mode():
                timing = bench.measure(lambda z=z: vae.decode(z).sample)
            bench.row("vae_decode", size, "plain", timing)
        except torch.OutOfMemoryError:
            bench.note(f"plain VAE decode at {size} ran out of memory")
            bench.free()
        if codec.needs_tiling(size, size):
            with torch.inference_mode():
                timing = bench.measure(lambda z=z: vae.tiled_decode(z).sample)
            bench.row("vae_decode", size, "plain_tiled", timing)
        bench.write()

    for size, z in latents.items():
        timing = bench.measure(lambda s=size, z=z: _vae_ours(vae, codec, s, z))
        bench.row("vae_decode", size, "ours", timing, tiled=codec.needs_tiling(size, size))
        bench.write()


def section_vae_compiled(bench: Bench, vae: Any) -> None:
    """Last, as it may compile for a minute or more. As the VaeDecoder runs it: static graphs for the
    sizes up to 1024x1024 (its warm-up sizes), the dynamic graph for larger (tiled) sizes."""
    if bench.args.skip_compile:
        return
    codec, latents = _vae_inputs(bench, vae)
    vae_compile.optimize_vae(vae, compile=True, channels_last=bench.args.vae_channels_last, backend=bench.backend)
    decoder = vae.decoder.forward
    firsts = {}
    for size, z in latents.items():
        recording = decoder.recording_static() if size <= 1024 else contextlib.nullcontext()
        with recording:
            firsts[size] = bench.first_call_s(lambda s=size, z=z: _vae_ours(vae, codec, s, z))
        bench.results["compile"]["vae"] = {"per_size_first_call_s": firsts}
        bench.write()
    print(f"  compile vae: {firsts}", flush=True)
    for size, z in latents.items():
        timing = bench.measure(lambda s=size, z=z: _vae_ours(vae, codec, s, z))
        bench.row("vae_decode", size, "ours_compiled", timing, tiled=codec.needs_tiling(size, size),
                  graph="static" if size <= 1024 else "dynamic")
        bench.write()


def make_prompt(encoder: Any, tokens: int) -> str:
    """A prompt from benchmarks/prompts.txt whose templated length is about `tokens`."""
    lines = [ln.strip() for ln in (ROOT / "benchmarks" / "prompts.txt").read_text().splitlines() if ln.strip()]
    words: list[str] = []
    for line in lines * 10:
        words += line.split()
        if len(encoder.token_ids(" ".join(words))) >= tokens:
            break
    while len(words) > 1 and len(encoder.token_ids(" ".join(words))) > tokens:
        words.pop()
    return " ".join(words)


def section_text(bench: Bench, source: Any) -> None:
    from deployments.core.text_encoding import PromptEncoder

    tokenizer = loading.load_tokenizer(source)
    model = loading.load_text_encoder(source, bench.device, bench.dtype, penultimate_only=False)
    encoder = PromptEncoder(tokenizer, model, bench.device)
    prompt = make_prompt(encoder, bench.args.prompt_tokens)
    n_tokens = len(encoder.token_ids(prompt))
    bench.results["text_prompt_tokens"] = n_tokens

    def plain() -> torch.Tensor:
        inputs = tokenizer(
            [encoder.template(prompt)], padding="max_length", max_length=512, truncation=True, return_tensors="pt"
        )
        mask = inputs.attention_mask.to(bench.device).bool()
        with torch.no_grad():
            hidden = model(
                input_ids=inputs.input_ids.to(bench.device), attention_mask=mask, output_hidden_states=True
            ).hidden_states[-2]
        return hidden[0][mask[0]]

    timing = bench.measure(plain)
    bench.row("text_encoder", None, "plain_full_pad512", timing, tokens=n_tokens)
    reference = plain().float().cpu()
    bench.write()

    loading.truncate_to_penultimate(model)
    timing = bench.measure(lambda: encoder.encode([prompt]))
    bench.row("text_encoder", None, "ours_truncated", timing, tokens=n_tokens)
    bench.results["accuracy"]["text_encoder/ours_truncated"] = rel_err(encoder.encode([prompt])[0].embedding, reference)
    bench.write()

    if bench.cuda:
        graphed = PromptEncoder(tokenizer, model, bench.device, cuda_graphs=True)
        start = time.perf_counter()
        captured = graphed.warmup()
        bench.results["compile"]["text_encoder_cuda_graphs"] = {"graphs": captured,
                                                                "capture_s": round(time.perf_counter() - start, 2)}
        timing = bench.measure(lambda: graphed.encode([prompt]))
        bench.row("text_encoder", None, "ours_cuda_graphs", timing, tokens=n_tokens)
        bench.results["accuracy"]["text_encoder/ours_cuda_graphs"] = rel_err(
            graphed.encode([prompt])[0].embedding, reference
        )
        bench.write()
        del graphed
        if not bench.args.skip_compile:  # what the TextEncoder runs: compiled layers inside the graphs
            compile_cache.configure_compile_cache(bench.args.cache_dir)
            text_encoder_compile.optimize_text_encoder(model, compile=True, backend=bench.backend)
            compiled = PromptEncoder(tokenizer, model, bench.device, cuda_graphs=True)
            start = time.perf_counter()
            captured = compiled.warmup()
            bench.results["compile"]["text_encoder_compiled_cuda_graphs"] = {
                "graphs": captured, "compile_and_capture_s": round(time.perf_counter() - start, 2)}
            timing = bench.measure(lambda: compiled.encode([prompt]))
            bench.row("text_encoder", None, "ours_compiled_cuda_graphs", timing, tokens=n_tokens)
            bench.results["accuracy"]["text_encoder/ours_compiled_cuda_graphs"] = rel_err(
                compiled.encode([prompt])[0].embedding, reference
            )
            batch = [make_prompt(encoder, t) for t in (40, 90, 160, 256, 120, 60, 200, 30)]
            timing = bench.measure(lambda: compiled.encode(batch))
            bench.row("text_encoder_batch8", None, "ours_compiled_cuda_graphs", timing, tokens=n_tokens)
            bench.write()
            del compiled

    del model, encoder
    bench.free()


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------

PLAIN = {
    "text_encoder": "plain_full_pad512",
    "dit_step": "plain_bf16_eager",
    "dit_8steps": "plain_pipeline",
    "vae_decode": "plain",
    "total": "plain",
}


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows with ratios (plain / ours) and, for the DiT, the FLOP floor; per-image totals appended."""
    rows = [dict(r) for r in results["rows"] if r["stage"] != "attention"]
    by_key = {(r["stage"], r["size"], r["variant"]): r for r in rows}

    # "ours" in the totals is what the stages run when configured as serve_config.yaml ships them.
    text = {v: by_key.get(("text_encoder", None, v))
            for v in ("plain_full_pad512", "ours_compiled_cuda_graphs", "ours_cuda_graphs", "ours_compiled",
                      "ours_truncated")}
    text_ours = next((r for v, r in text.items() if v != "plain_full_pad512" and r), None)
    sizes = sorted({r["size"] for r in rows if r["size"] is not None})
    for size in sizes:
        vae_plain = by_key.get(("vae_decode", size, "plain")) or by_key.get(("vae_decode", size, "plain_tiled"))
        vae_ours = by_key.get(("vae_decode", size, "ours_compiled")) or by_key.get(("vae_decode", size, "ours"))
        plain_parts = (text["plain_full_pad512"], by_key.get(("dit_8steps", size, "plain_pipeline")), vae_plain)
        if all(plain_parts):
            rows.append({"stage": "total", "size": size, "variant": "plain",
                         "median_ms": sum(p["median_ms"] for p in plain_parts)})
        for variant in ("ours_bf16", "ours_fp8"):
            parts = (text_ours, by_key.get(("dit_8steps", size, variant)), vae_ours)
            if all(parts):
                rows.append({"stage": "total", "size": size, "variant": variant,
                             "median_ms": sum(p["median_ms"] for p in parts)})
    by_key = {(r["stage"], r["size"], r["variant"]): r for r in rows}

    steps = results["meta"]["args"].get("steps", 8)
    for r in rows:
        plain = by_key.get((r["stage"], r["size"], PLAIN.get(r["stage"], "")))
        if plain is not None and plain is not r:
            r["plain_over_ours"] = plain["median_ms"] / r["median_ms"]
        flops, repeat = r, 1
        if r["stage"] == "dit_8steps":
            step_variant = "plain_bf16_eager" if r["variant"] == "plain_pipeline" else r["variant"]
            flops, repeat = by_key.get(("dit_step", r["size"], step_variant)) or {}, steps
        if flops.get("flops_linear") and results["meta"]["device"] != "cpu":
            parts = {"linear": repeat * flops["flops_linear"], "attention": repeat * flops["flops_attention"]}
            r["floor_ms"] = floor_ms(parts, fp8=r["variant"].endswith("fp8"))
            r["floor_share"] = r["floor_ms"] / r["median_ms"]
    return rows


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {str(k): _rounded(v) for k, v in value.items()}
    return value


def print_table(results: dict[str, Any]) -> None:
    rows = summarize(results)
    meta = results["meta"]
    print()
    print(f"device {meta['device']} | torch {meta['torch']} | model {meta['model']} | {meta['dtype']} | "
          f"commit {meta['commit']} | {meta['date']}")
    header = f"{'stage':<13} {'size':>5} {'variant':<22} {'median ms':>10} {'plain/ours':>10} {'floor ms':>9} " \
             f"{'% floor':>8} {'peak GB':>8}"
    print(header)
    print("-" * len(header))
    order = ["text_encoder", "dit_step", "dit_8steps", "vae_decode", "total"]
    rows = sorted(rows, key=lambda r: (order.index(r["stage"]) if r["stage"] in order else 99, r["size"] or 0))
    for r in rows:
        ratio = f"{r['plain_over_ours']:.2f}x" if "plain_over_ours" in r else ""
        floor = f"{r['floor_ms']:.1f}" if "floor_ms" in r else ""
        share = f"{100 * r['floor_share']:.0f}%" if "floor_share" in r else ""
        peak = f"{r['peak_gb']:.2f}" if r.get("peak_gb") else ""
        print(f"{r['stage']:<13} {str(r['size'] or ''):>5} {r['variant']:<22} {r['median_ms']:>10.2f} {ratio:>10} "
              f"{floor:>9} {share:>8} {peak:>8}")
    attention = results.get("attention_per_layer", {}).get("backends", {})
    if attention:
        print("SDPA per layer at 1024x1024: " + ", ".join(
            f"{name.lower()} {t['median_ms']:.2f} ms ({t['tflops']:.0f} TFLOP/s)" for name, t in attention.items()))
    if results["compile"]:
        print("compile seconds: " + json.dumps(_rounded(results["compile"])))
    if results["accuracy"]:
        print("relative error vs plain: " + ", ".join(f"{k} {v:.2e}" for k, v in results["accuracy"].items()))
    for key in ("dit_bf16_weights_gb", "dit_fp8_weights_gb", "dit_fp8_load_peak_gb"):
        if key in results:
            print(f"{key}: {results[key]:.2f}")
    for text in results["notes"]:
        print(f"note: {text}")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="random", help="random (full size, GPU), tiny, or a checkpoint directory")
    p.add_argument("--sizes", default="512,1024,2048", help="square sizes in pixels, comma separated")
    p.add_argument("--full-max", type=int, default=1024, help="run the 8-step loops only up to this size")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--caption-tokens", type=int, default=160, help="caption length for the DiT")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length for the text encoder")
    p.add_argument("--repeats", type=int, default=0, help="timed runs per figure (default 5, 3 with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer repeats, no cache-restart measurement")
    p.add_argument("--skip-fp8", action="store_true")
    p.add_argument("--skip-compile", action="store_true", help="our path eager (real RoPE, fusion, FP8 still on)")
    p.add_argument("--skip-text", action="store_true")
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--attention", default="cudnn", choices=sorted(rotary.ATTENTION_BACKENDS))
    p.add_argument("--vae-tile-px", type=int, default=1280, help="VAE tile side above the tiling threshold")
    p.add_argument("--vae-tile-overlap", type=float, default=0.2)
    p.add_argument("--vae-channels-last", action="store_true", help="compiled VAE in channels-last layout")
    p.add_argument("--dynamic", default="marked", choices=sorted(DYNAMIC),
                   help="DiT shapes: batch and sequence dims marked dynamic, dynamo's automatic, or static")
    p.add_argument("--fp8-tune", action="store_true", help="let torchao turn on coordinate-descent tuning")
    p.add_argument("--compile-backend", default=None, help="default inductor on CUDA, eager on the CPU smoke run")
    p.add_argument("--cache-dir", default=None, help="compile cache directory (default: a fresh one, so cold)")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip later sections past this many seconds")
    p.add_argument("--json", default=None,
                   help="write results here, after every section (default: a timestamped file in the temp dir)")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    args.dit_sizes = list(args.sizes)
    args.full_sizes = [s for s in args.sizes if s <= args.full_max]
    if args.cache_dir is None:
        args.cache_dir = tempfile.mkdtemp(prefix="zimage-compile-")
    if args.json is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        args.json = str(Path(tempfile.gettempdir()) / f"zimage-bench-stages-{stamp}.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --model tiny for a smoke run", file=sys.stderr)
        return 2
    bench = Bench(args)
    source = resolve_model_source(args.model)
    state: dict[str, Any] = {}
    print(f"bench: {bench.results['meta']['device']}, sizes {args.sizes}, repeats {bench.repeats}, "
          f"compile backend {bench.backend}, cache {args.cache_dir}", flush=True)

    vae = loading.load_vae(source, bench.device, bench.dtype)
    from diffusers import ZImageTransformer2DModel

    cfg = ZImageTransformer2DModel.load_config(source.location, subfolder="transformer") if not source.is_random \
        else None
    if cfg is None:
        from deployments.core.random_model import FULL_TRANSFORMER_CONFIG

        cfg = dict(FULL_TRANSFORMER_CONFIG)
    dit_cfg = argparse.Namespace(**{k: v for k, v in dict(cfg).items() if not k.startswith("_")})
    bench.results["dit_flops_per_step"] = {
        size: dit_step_flops(dit_cfg, size, size, args.caption_tokens) for size in args.dit_sizes
    }

    sections: list[tuple[str, float, Callable[[], None]]] = [
        ("attention", 10, lambda: section_attention(bench, dit_cfg)),
        ("dit_plain", 30, lambda: section_dit_plain(bench, source, vae, state)),
        ("vae", 20, (lambda: None) if args.skip_vae else (lambda: section_vae(bench, vae))),
        ("text", 20, (lambda: None) if args.skip_text else (lambda: section_text(bench, source))),
        ("dit_bf16", 30, lambda: section_dit_bf16(bench, source, state)),
        ("dit_fp8", 60, (lambda: None) if args.skip_fp8 else (lambda: section_dit_fp8(bench, source, state))),
        ("vae_compiled", 60, (lambda: None) if args.skip_vae else (lambda: section_vae_compiled(bench, vae))),
    ]
    status = 0
    for name, needs_s, run in sections:
        if bench.remaining() < needs_s:
            bench.note(f"section {name} skipped: {bench.remaining():.0f} s of the budget left")
            continue
        print(f"[{bench.elapsed():6.1f} s] {name}", flush=True)
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - record and go on: later sections still give data
            status = 1
            bench.note(f"section {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            traceback.print_exc()
            bench.free()
        bench.results.setdefault("sections_done", []).append(name)
        bench.write()
    bench.write()
    print_table(bench.results)
    print(f"\nwrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
