"""Where one DiT step's (and one prompt encoding's) GPU time goes, for a few variants, in one run.

    python benchmarks/profile_step.py --json profile.json                 # H200, model `random`
    python benchmarks/profile_step.py --variants fp8-row,fp8-row-graph --skip-text
    python benchmarks/profile_step.py --variants fp8-fused-graph --lora-rank 32 --skip-text --skip-vae --skip-reference

For each DiT variant: the median step time (CUDA events, batch 1, 160-token caption), kernel time by
category from `torch.profiler` (FP8 GEMM, bf16 GEMM, attention, generated Triton kernels, other), the
GPU idle time between kernels (step time minus kernel time: launch and Python overhead), the top
kernels, and the relative error of one step against diffusers' eager bf16 transformer. Variants:
- `fp8-row`: what the Denoiser runs (real RoPE, fused projections, torchao FP8 rowwise, regional
  compile);
- `fp8-tensor`: the same with one FP8 scale per tensor (cuBLAS's tensorwise FP8 GEMM);
- `fp8-fused` / `fp8-fused-bf16attn`: our fused Triton kernels and pre-quantized FP8 GEMMs, with
  cuDNN's FP8 attention / bf16 attention (`dit.fused_block`);
- `+mk` / `+cdt` after a variant's name: inductor's multi-kernel (persistent and looped reductions
  both generated, the faster picked at run time) / coordinate-descent tuning of generated kernels;
- `<variant>-graph`: the same module with the whole forward captured as one CUDA graph.
With `--lora-rank R`, every DiT variant's model carries adapter slots (as a Denoiser's does) and each
of its rows is measured again with one random rank-R adapter on all its target linears
(`<variant>+lora<R>`, the adapter's kernels under `lora`): where a step with adapters spends what a
plain one does not.
For the text encoder (one prompt of `--prompt-tokens`): eager, CUDA graphs, and compiled decoder
layers inside CUDA graphs (what the TextEncoder runs), with their kernel breakdown.
For the VAE decoder at `--size`: compiled as the VaeDecoder runs a warm-up size (a static graph),
with and without channels-last memory and cuDNN's autotuner (`torch.backends.cudnn.benchmark`).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.harness import cuda_missing, cuda_time_ms, graphed, rel_err  # noqa: E402
from benchmarks.run_info import commit  # noqa: E402
from benchmarks.stages.dit import dit_step_inputs  # noqa: E402
from benchmarks.stages.text_encoder import make_prompt  # noqa: E402
import deployments.text_encoder.compile as text_encoder_compile  # noqa: E402
import deployments.vae.compile as vae_compile  # noqa: E402
from deployments.runtime import compile_cache  # noqa: E402
from deployments.weights import loading  # noqa: E402
from deployments.denoiser.dit import optimize  # noqa: E402
from deployments.geometry import latent_shape  # noqa: E402
from deployments.weights.model_source import resolve_model_source  # noqa: E402

CATEGORIES = (  # first match wins; generated kernels are named after every op they fused
    ("lora", ("lora",)),
    ("fused_triton", ("norm_modulate_quant", "gated_residual", "swiglu_quant", "qkv_norm_rope_quant")),
    ("triton", ("triton",)),
    ("attention", ("fmha", "flash", "cudnn", "attention", "sdpa")),
    ("gemm_fp8", ("qqtst", "f8f8", "e4m3", "fp8")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "matmul")),
)


INDUCTOR_FLAGS = {
    "mk": {"triton.multi_kernel": 1},
    "cdt": {"coordinate_descent_tuning": True},
}


def category(kernel: str) -> str:
    name = kernel.lower()
    for label, needles in CATEGORIES:
        if any(n in name for n in needles):
            return label
    return "other"


def timed(fn: Callable[[], Any], repeats: int = 10, warmups: int = 3) -> dict[str, float]:
    for _ in range(warmups):
        fn()
    torch.cuda.synchronize()
    times = [cuda_time_ms(fn) for _ in range(repeats)]
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def kernel_breakdown(fn: Callable[[], Any], calls: int = 3, top: int = 12) -> dict[str, Any]:
    """Kernel time per call by category and the largest kernels, from the CUDA activity trace."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    by_cat: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    kernels: list[tuple[str, float, int]] = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
        if us <= 0 or str(getattr(evt, "device_type", "")).endswith("CPU"):
            continue
        cat = category(evt.key)
        by_cat[cat] += us / 1000.0 / calls
        count[cat] += evt.count // calls
        kernels.append((evt.key, us / 1000.0 / calls, evt.count // calls))
    kernels.sort(key=lambda k: -k[1])
    return {
        "kernel_ms": round(sum(by_cat.values()), 3),
        "by_category_ms": {k: round(v, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "launches_by_category": dict(count),
        "top_kernels": [{"name": n[:140], "ms": round(ms, 3), "launches": c} for n, ms, c in kernels[:top]],
    }


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device("cuda")
        self.dtype = torch.bfloat16
        self.source = resolve_model_source(args.model)
        self.started = time.perf_counter()
        self.results: dict[str, Any] = {
            "meta": {
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "commit": commit(),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": args.model,
                "size": args.size,
                "caption_tokens": args.caption_tokens,
                "prompt_tokens": args.prompt_tokens,
            },
            "dit": {},
            "text": {},
            "vae": {},
            "notes": [],
        }
        self.adapter_dir: Path | None = None
        if args.lora_rank:  # one adapter file for every variant, from the model's shapes alone
            from benchmarks.lora_files import transformer_shapes, write_random_adapters

            self.adapter_dir = Path(tempfile.mkdtemp(prefix="zimage-profile-lora-"))
            write_random_adapters(transformer_shapes(args.model), self.adapter_dir, count=1, rank=args.lora_rank,
                                  prefix="adapter")
            self.results["meta"]["lora_rank"] = args.lora_rank

    def remaining(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def write(self) -> None:
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(self.results, indent=2))

    def free(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def step_inputs(self, cfg: Any) -> tuple:
        return dit_step_inputs(cfg, self.args.size, self.args.caption_tokens, self.device, self.dtype)

    # ---- DiT

    def dit_reference(self) -> torch.Tensor:
        transformer = loading.load_transformer(self.source, self.device, self.dtype)
        inputs = self.step_inputs(transformer.config)
        with torch.inference_mode():
            out = transformer(*inputs, return_dict=False)[0][0].float().cpu()
        del transformer
        self.free()
        return out

    def dit_variant(self, name: str, reference: torch.Tensor | None) -> None:
        base = name.removesuffix("-graph")
        model, *flags = base.split("+")
        scaling = {"fp8-row": "row", "fp8-tensor": "tensor", "fp8-fused": "row", "fp8-fused-bf16attn": "row"}.get(model)
        if (scaling is None and model != "bf16") or set(flags) - set(INDUCTOR_FLAGS):
            raise ValueError(f"unknown variant {name!r}")
        patch = {k: v for f in flags if f in INDUCTOR_FLAGS for k, v in INDUCTOR_FLAGS[f].items()}
        with torch._inductor.config.patch(patch):
            self._dit_variant(name, base, model, scaling, reference)

    def _dit_variant(self, name: str, base: str, model: str, scaling: str | None, reference: torch.Tensor | None) -> None:
        transformer = loading.load_transformer(self.source, self.device, self.dtype)
        t0 = time.perf_counter()
        optimize.optimize_transformer(
            transformer, "bf16" if model == "bf16" else "fp8", compile=True, cache_dir=self.args.cache_dir,
            attention="cudnn", fp8_scaling=scaling or "row",
            fp8_kernels={"fp8-fused": "fused", "fp8-fused-bf16attn": "fused-bf16-attention"}.get(model, "inductor"),
        )
        self.free()
        inputs = self.step_inputs(transformer.config)
        with_adapter = self.adapter_rows(transformer)

        def step() -> torch.Tensor:
            with torch.inference_mode():
                return transformer(*inputs, return_dict=False)[0][0]

        first = time.perf_counter()
        out = step()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - first
        row: dict[str, Any] = {"rewrite_s": round(first - t0, 2), "first_call_s": round(compile_s, 2)}
        if reference is not None:
            row["one_step_rel_err_vs_plain"] = rel_err(out.float(), reference)
        variants = [(base, step)]
        if with_adapter is not None:
            def adapter_step() -> torch.Tensor:
                with with_adapter():
                    return step()

            variants.append((f"{base}+lora{self.args.lora_rank}", adapter_step))
        if name.endswith("-graph") or self.args.always_graph:
            for label, fn in list(variants):
                def captured_step(fn=fn) -> None:
                    fn()

                try:
                    variants.append((label.replace(base, f"{base}-graph", 1), graphed(captured_step)))
                except Exception as exc:  # noqa: BLE001 - the reason is the finding
                    self.results["notes"].append(f"{label}: CUDA graph capture failed: {type(exc).__name__}: "
                                                 f"{exc}"[:400])
        for label, fn in variants:
            entry = dict(row) if label == base else {}
            entry.update(timed(fn))
            entry["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            entry.update(kernel_breakdown(fn))
            entry["idle_ms"] = round(entry["median_ms"] - entry["kernel_ms"], 3)
            self.results["dit"][label] = entry
            print(f"  {label}: {entry['median_ms']:.2f} ms, kernels {entry['kernel_ms']:.2f} ms, "
                  f"{entry['by_category_ms']}", flush=True)
            self.write()
        transformer = variants = with_adapter = None  # noqa: F841 - drop the closures' model before freeing
        torch._dynamo.reset()
        self.free()

    def adapter_rows(self, transformer) -> Callable[[], Any] | None:
        """With `--lora-rank`: the model's adapter slots installed (before its first step, as a Denoiser
        has them) and a context under which its one row carries the adapter; else None."""
        if self.adapter_dir is None:
            return None
        from deployments.contracts import LoraRef
        from deployments.denoiser.lora.cache import AdapterCache
        from deployments.denoiser.lora.library import LoraLibrary, LoraSettings
        from deployments.denoiser.lora.slots import install_lora

        slots = install_lora(transformer)
        cache = AdapterCache(LoraLibrary(LoraSettings(lora_dir=str(self.adapter_dir))), slots, capacity_bytes=1 << 40)
        adapter = cache.resolve([LoraRef("adapter0")])[0]
        return lambda: slots.using([(adapter,)])

    # ---- VAE

    def vae(self) -> None:
        from deployments.contracts import Latents
        from deployments.vae.codec import VaeCodec

        size = self.args.size
        z = torch.randn(latent_shape(16, size, size), generator=torch.Generator("cpu").manual_seed(1))
        for channels_last in (False, True):
            for benchmark in (False, True):
                label = f"compiled{'/channels_last' if channels_last else ''}{'/cudnn_benchmark' if benchmark else ''}"
                torch._dynamo.reset()
                torch.backends.cudnn.benchmark = benchmark
                vae = loading.load_vae(self.source, self.device, self.dtype)
                vae_compile.optimize_vae(vae, compile=True, channels_last=channels_last)
                codec = VaeCodec(vae, self.device, self.dtype)
                item = [Latents(latents=z, width=size, height=size)]
                t0 = time.perf_counter()
                with vae.decoder.forward.recording_static():  # a warm-up size, as in the VaeDecoder
                    codec.decode(item)
                first = time.perf_counter() - t0

                def decode(vae=vae, item=item) -> Any:
                    with torch.inference_mode():
                        return vae.decode(item[0].latents.to(self.device, self.dtype)
                                          .to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)).sample

                entry = {"first_call_s": round(first, 2), **timed(lambda: codec.decode(item)), **kernel_breakdown(decode)}
                self.results["vae"][label] = entry
                print(f"  vae {label}: {entry['median_ms']:.2f} ms (kernels {entry['kernel_ms']:.2f})", flush=True)
                self.write()
                vae = codec = None  # noqa: F841
                self.free()
        torch.backends.cudnn.benchmark = False

    # ---- text encoder

    def text(self) -> None:
        """The TextEncoder's paths: eager, CUDA graphs, compiled layers inside CUDA graphs."""
        from deployments.text_encoder.encoding import PromptEncoder

        tokenizer = loading.load_tokenizer(self.source)
        model = loading.load_text_encoder(self.source, self.device, self.dtype)
        eager = PromptEncoder(tokenizer, model, self.device)
        prompt = make_prompt(eager, self.args.prompt_tokens)
        tokens = len(eager.token_ids(prompt))
        ids = torch.tensor([eager.token_ids(prompt)], device=self.device)
        reference = eager.encode([prompt])[0].embedding.float()

        def forward() -> Any:
            with torch.inference_mode():
                return eager.run_model(ids)

        def record(label: str, encoder: PromptEncoder, **extra: Any) -> None:
            entry = {"tokens": tokens, **extra, **timed(lambda: encoder.encode([prompt]))}
            entry["rel_err_vs_eager"] = rel_err(encoder.encode([prompt])[0].embedding.float(), reference)
            self.results["text"][label] = entry
            print(f"  text {label}: {entry['median_ms']:.2f} ms", flush=True)
            self.write()

        record("eager", eager, **kernel_breakdown(forward))
        record("cuda_graphs", PromptEncoder(tokenizer, model, self.device, cuda_graphs=True))
        compile_cache.configure_compile_cache(self.args.cache_dir)
        t0 = time.perf_counter()
        text_encoder_compile.optimize_text_encoder(model, compile=True)
        forward()
        torch.cuda.synchronize()
        compiled = PromptEncoder(tokenizer, model, self.device, cuda_graphs=True)
        compiled.encode([prompt])
        record("compiled_cuda_graphs", compiled, compile_and_capture_s=round(time.perf_counter() - t0, 2),
               **kernel_breakdown(forward))
        model = eager = compiled = None  # noqa: F841
        self.free()


def print_table(results: dict[str, Any]) -> None:
    cats = ("gemm_fp8", "gemm", "attention", "fused_triton", "triton", "lora", "other")
    print("\n| what | median ms | kernels ms | idle ms | " + " | ".join(cats) + " | one-step err |")
    print("| --- " * (5 + len(cats)) + "|")
    for section in ("dit", "text", "vae"):
        for label, e in results[section].items():
            if "kernel_ms" not in e:
                print(f"| {section} {label} | {e['median_ms']:.2f} |" + " |" * (3 + len(cats)))
                continue
            idle = e["median_ms"] - e["kernel_ms"]
            cells = " | ".join(f"{e['by_category_ms'].get(c, 0.0):.2f}" for c in cats)
            err = e.get("one_step_rel_err_vs_plain", e.get("rel_err_vs_eager"))
            print(f"| {section} {label} | {e['median_ms']:.2f} | {e['kernel_ms']:.2f} | {idle:.2f} | {cells} | "
                  f"{'' if err is None else f'{err:.2e}'} |")
    for note in results["notes"]:
        print("note:", note)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--caption-tokens", type=int, default=160)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--variants", default="fp8-row-graph,fp8-tensor-graph",
                   help="comma separated: bf16, fp8-row, fp8-tensor, each optionally with -graph")
    p.add_argument("--always-graph", action="store_true", help="also time every variant as one CUDA graph")
    p.add_argument("--lora-rank", type=int, default=0, help="also each DiT row with one random adapter of this rank")
    p.add_argument("--skip-reference", action="store_true", help="no diffusers eager step for the error")
    p.add_argument("--skip-text", action="store_true")
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--cache-dir", default=None, help="compile cache (default: a fresh one, so cold)")
    p.add_argument("--budget-s", type=float, default=540.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="zimage-profile-")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if cuda_missing("profile_step.py"):
        return 2
    run = Run(args)
    status = 0
    steps: list[tuple[str, Callable[[], None]]] = []
    reference: dict[str, torch.Tensor | None] = {"out": None}
    if not args.skip_reference:
        steps.append(("reference", lambda: reference.update(out=run.dit_reference())))
    for variant in filter(None, args.variants.split(",")):
        steps.append((variant, lambda v=variant: run.dit_variant(v, reference["out"])))
    if not args.skip_text:
        steps.append(("text", run.text))
    if not args.skip_vae:
        steps.append(("vae", run.vae))
    for name, fn in steps:
        if run.remaining() < 45:
            run.results["notes"].append(f"{name} skipped: budget")
            continue
        print(f"[{time.perf_counter() - run.started:6.1f} s] {name}", flush=True)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - later variants still give data
            status = 1
            run.results["notes"].append(f"{name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            traceback.print_exc()
            torch._dynamo.reset()
            run.free()
        run.write()
    print_table(run.results)
    return status


if __name__ == "__main__":
    sys.exit(main())
