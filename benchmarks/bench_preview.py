"""What one streamed partial image costs at a given size, part by part, beside the final decode.

A preview is: the clean-latent estimate after a step and its copy to the host (on the Denoiser's
model thread, `denoising.clean_estimate`), the VAE decoder on those latents pooled 2x2
(`VaeCodec.preview`, on the VaeDecoder), and the encoding of the half-size image (on the Ingress, CPU).
GPU parts are timed with CUDA events; on a CPU (`--model tiny`, a smoke run) with the wall clock.

    python -m benchmarks.bench_preview --model random --size 1024x1024 --out benchmarks/results/preview.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import cuda_time_ms
from benchmarks.run_info import commit
from deployments.weights import loading
from deployments.contracts import DenoiseJob, Latents
from deployments.denoiser.loop import DenoiseState, Schedule, clean_estimate
from deployments.geometry import latent_shape, parse_size
from deployments.vae.codec import VaeCodec
from deployments.settings import ModelSettings
from serve_app.image_io import encode_output


def median_ms(fn: Callable[[], Any], repeats: int, on_gpu: bool) -> float:
    fn()  # warm: first calls plan kernels
    times = []
    for _ in range(repeats):
        if on_gpu:
            times.append(cuda_time_ms(fn))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random", help="random (full size, GPU) or tiny (CPU smoke run)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="bench_preview.json")
    args = parser.parse_args()

    settings = ModelSettings(model=args.model, device=args.device)
    device, dtype = settings.torch_device(), settings.dtype()
    on_gpu = device.type == "cuda"
    width, height = parse_size(args.size)
    codec = VaeCodec(loading.load_vae(settings.source(), device, dtype), device, dtype)

    shape = latent_shape(16, width, height)
    state = DenoiseState(
        job=DenoiseJob(caption=torch.zeros(1, 1), width=width, height=height, steps=8, seed=0),
        latents=torch.randn(shape, device=device), schedule=Schedule(torch.zeros(8), torch.linspace(1, 0, 9)),
        caption=torch.zeros(1, 1), negative_caption=None, step_index=3,
    )
    noise_pred = torch.randn(shape, device=device)
    latents = Latents(clean_estimate(state, noise_pred), width, height)
    preview = codec.preview([latents])[0]

    parts = {
        "clean_estimate_to_host_ms": median_ms(lambda: clean_estimate(state, noise_pred), args.repeats, on_gpu),
        "preview_decode_ms": median_ms(lambda: codec.preview([latents]), args.repeats, on_gpu),
        "preview_png_ms": median_ms(lambda: encode_output(preview.pixels, "png", None), args.repeats, False),
    }
    total = round(sum(parts.values()), 3)
    full = median_ms(lambda: codec.decode([latents]), max(3, args.repeats // 4), on_gpu)
    result = {
        "benchmark": "bench_preview", "model": args.model, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "dtype": str(dtype), "size": args.size, "preview_size": f"{preview.width}x{preview.height}",
        "timer": "cuda events" if on_gpu else "wall clock", "repeats": args.repeats,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
        **parts, "ms_per_preview": total, "full_decode_ms": full,
    }
    print(f"{args.size} on {result['device']}: {total} ms per preview "
          f"(estimate {parts['clean_estimate_to_host_ms']}, decode {parts['preview_decode_ms']} at "
          f"{result['preview_size']}, png {parts['preview_png_ms']}); the full decode takes {full} ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
