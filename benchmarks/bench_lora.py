"""LoRA adapters on the DiT: the step with and without adapters, and the cost of an unseen adapter.

On one GPU with the `random` model (FP8 through torchao and inductor, the path that applies adapters;
`--precision bf16` for bf16), one run, figures side by side:

- one DiT forward at 1024x1024 (batch 1): no adapter, one rank-32 adapter on every attention and
  feed-forward linear (target: at most 1.08x the base);
- a batch of 8: no adapters, and 8 images over 4 rank-32 adapters, two images each (target: at most
  1.12x the base batch);
- an unseen rank-32 adapter file: `AdapterCache.resolve` (read, convert, lay out on the GPU) against a
  cached one (target: at most 1.5 s more).

    python -m benchmarks.bench_lora --out benchmarks/results/lora.json           # H200, random model
    python -m benchmarks.bench_lora --model tiny --device cpu --size 256 --no-compile --repeats 2  # smoke

Writes JSON with device, date and commit. The 20-client load at 1024x1024 with each request picking
one of 8 rank-32 adapters, against the same load without adapters in the same run (target: at least
0.85x its throughput), and the served first request for an unseen adapter, run in bench_serve (its
docstring says more):

    python benchmarks/bench_serve.py --one-gpu --set fp8_kernels=inductor --loads 1024 --lora-random 8 \
        --lora-rank 32 --skip-baseline --json benchmarks/results/serve_lora.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.run_info import commit


def timed(fn, device: torch.device, repeats: int, warmups: int = 2) -> float:
    """Median milliseconds of `fn()` (device-synchronized)."""
    for _ in range(warmups):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=["bf16", "fp8"], default="fp8")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--caption-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from deployments.contracts import LoraRef
    from deployments.denoiser.dit.optimize import optimize_transformer
    from deployments.denoiser.dit.warmup import WarmupCall, run_call
    from deployments.denoiser.lora.cache import AdapterCache
    from deployments.denoiser.lora.library import LoraLibrary, LoraSettings
    from deployments.geometry import latent_shape
    from deployments.weights.loading import load_transformer
    from deployments.weights.model_source import resolve_model_source
    from benchmarks.lora_files import write_random_adapters

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = load_transformer(resolve_model_source(args.model), device, dtype)
    directory = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    # 4 for the batch, 1 never loaded before the unseen-adapter timing
    write_random_adapters(transformer, directory, count=5, rank=args.rank, prefix="adapter")
    precision = args.precision if device.type == "cuda" else "bf16"
    optimize_transformer(transformer, precision, compile=not args.no_compile, fp8_kernels="inductor")
    slots = transformer._lora_slots
    cache = AdapterCache(LoraLibrary(LoraSettings(lora_dir=str(directory))), slots, capacity_bytes=1 << 40)
    adapters = [cache.resolve([LoraRef(f"adapter{i}")])[0] for i in range(4)]

    generator = torch.Generator("cpu").manual_seed(0)
    shape = latent_shape(transformer.config.in_channels, args.size, args.size)

    def inputs(batch: int):
        latents = [torch.randn(shape, generator=generator).to(device, dtype).unsqueeze(2)[0] for _ in range(batch)]
        captions = [torch.randn(args.caption_tokens, transformer.config.cap_feat_dim, generator=generator)
                    .to(device, dtype) for _ in range(batch)]
        return latents, torch.full((batch,), 0.5, device=device), captions

    def step(batch: int, rows):
        latents, t, captions = inputs(batch)

        @torch.inference_mode()
        def call():
            with slots.using(rows):
                transformer(latents, t, captions, return_dict=False)

        return call

    if not args.no_compile:  # the graphs with and without adapters, batch 1 and over 1, before timing
        for batch, rank in ((1, 0), (1, args.rank), (8, 0), (8, args.rank)):
            run_call(transformer, WarmupCall("warm", args.size, args.size, (args.caption_tokens,) * batch, rank))
    figures: dict[str, float] = {}
    figures["b1_base_ms"] = timed(step(1, [()]), device, args.repeats)
    figures["b1_one_adapter_ms"] = timed(step(1, [(adapters[0],)]), device, args.repeats)
    figures["b8_base_ms"] = timed(step(8, [()] * 8), device, args.repeats)
    figures["b8_four_adapters_ms"] = timed(step(8, [(adapters[i // 2],) for i in range(8)]), device, args.repeats)
    figures["b1_ratio"] = figures["b1_one_adapter_ms"] / figures["b1_base_ms"]
    figures["b8_ratio"] = figures["b8_four_adapters_ms"] / figures["b8_base_ms"]

    start = time.perf_counter()
    cache.resolve([LoraRef("adapter4")])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    figures["unseen_adapter_s"] = time.perf_counter() - start
    start = time.perf_counter()
    cache.resolve([LoraRef("adapter4")])
    figures["cached_adapter_s"] = time.perf_counter() - start
    figures["adapter_file_bytes"] = (directory / "adapter4.safetensors").stat().st_size
    figures["adapter_resident_bytes"] = cache.resolve([LoraRef("adapter4")])[0][0].nbytes

    result = {
        "meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}},
        "figures": figures,
        "targets": {"b1_ratio": 1.08, "b8_ratio": 1.12, "unseen_minus_cached_s": 1.5},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
