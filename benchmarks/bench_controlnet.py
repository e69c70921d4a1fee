"""One DiT step with and without the ControlNet, on one device, in one run.

The full-size random DiT and a random Union 2.1-shaped ControlNet (`controlnet: random`), one image at
`--size`: FLOPs of a plain and a controlled forward counted by torch's `FlopCounterMode` on the eager
bf16 model, then the DiT optimized as the Denoiser ships it (real RoPE, fused projections, FP8 with
`fp8_kernels auto`, regional compile; the ControlNet's blocks in bf16 on the real-valued processor)
and a plain step and a controlled step timed through the Denoiser's own loop (median of `--repeats`).
Prints the FLOP ratio beside the time ratio, and the first controlled request (one step) against a
warm one after the Denoiser's start-up warm-up at `--size` (`--warmup control`: with its controlled
calls, `deployments.denoiser.control_warmup`; `plain`: without them, as before they existed). The FLOP
count runs the ControlNet once before the warm-up: `--no-flops` leaves it out, so the first request is
the first the process makes with control outside the warm-up (tests/gpu/test_gpu_controlnet.py).

    python benchmarks/bench_controlnet.py --json benchmarks/results/controlnet.json          # one H200
    python benchmarks/bench_controlnet.py --device cpu --model tiny --controlnet tiny --size 256 --no-optimize
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="random")
    p.add_argument("--controlnet", default="random")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--caption-tokens", type=int, default=160)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-optimize", action="store_true", help="time the eager model (CPU smoke run)")
    p.add_argument("--warmup", choices=("control", "plain"), default="control",
                   help="the start-up warm-up with or without its controlled calls")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (an eager controlled forward)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from deployments.contracts import DenoiseJob
    from deployments.denoiser.control import ControlContext, ControlNetRunner, control_context
    from deployments.denoiser.control_warmup import serving_control_calls
    from deployments.denoiser.dit.warmup import run_calls, serving_calls
    from deployments.denoiser.dit.optimize import optimize_transformer
    from deployments.denoiser.loop import DenoiseLoop
    from deployments.settings import ModelSettings
    from deployments.weights.controlnet_source import load_controlnet, resolve_controlnet
    from deployments.weights.loading import load_scheduler, load_transformer
    from deployments.weights.model_source import resolve_model_source

    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = resolve_model_source(args.model)
    transformer = load_transformer(source, device, dtype)
    controlnet = load_controlnet(resolve_controlnet(args.controlnet), device, dtype)
    runner = ControlNetRunner(controlnet, transformer)
    hidden = transformer.config.cap_feat_dim
    generator = torch.Generator("cpu").manual_seed(0)
    caption = torch.randn(args.caption_tokens, hidden, generator=generator)
    latents = torch.randn(1, 16, args.size // 8, args.size // 8, generator=generator)
    control = ControlContext(control_context(latents, runner.in_dim), 0.75)

    def job(controlled: bool) -> DenoiseJob:
        return DenoiseJob(caption=caption, width=args.size, height=args.size, steps=1, seed=0,
                          control=control if controlled else None)

    def forward(controlled: bool) -> None:
        x = [latents.to(device, dtype)[0].unsqueeze(1)]
        t = torch.tensor([0.5], device=device)
        caps = [caption.to(device, dtype)]
        with torch.inference_mode():
            if controlled:
                runner.forward(x, t, caps, [control])
            else:
                transformer(x, t, caps, return_dict=False)

    flops = {}
    for controlled in () if args.no_flops else (False, True):
        with FlopCounterMode(display=False) as counter:
            forward(controlled)
        flops["controlled" if controlled else "plain"] = counter.get_total_flops()
    if not args.no_optimize:
        kernels = ModelSettings(fp8_kernels="auto").dit_fp8_kernels(device)
        optimize_transformer(transformer, "fp8", compile=True, fp8_kernels=kernels)
        runner = ControlNetRunner(controlnet, transformer)  # again: the control blocks take the real RoPE
    loop = DenoiseLoop(transformer, load_scheduler(source), device, dtype, control=runner)

    def step_s(controlled: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loop.run([job(controlled)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # the Denoiser's start-up warm-up at this size and caption length (batch 1, its caption buckets)
    single, _ = serving_calls([(args.size, args.size)], 1, args.caption_tokens)
    if args.warmup == "control":
        single += serving_control_calls(single, [], runner.takes_mask)[0]
    warmup_s = run_calls(transformer, single, save=False, control=runner)
    first_controlled = step_s(True)
    times = {name: statistics.median(step_s(name == "controlled") for _ in range(args.repeats))
             for name in ("plain", "controlled")}
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "size": args.size,
        "caption_tokens": args.caption_tokens, "optimized": not args.no_optimize,
        "gflops": {k: v / 1e9 for k, v in flops.items()},
        "flop_ratio": flops["controlled"] / flops["plain"] if flops else None,
        "warmup": args.warmup, "warmup_calls": {k: round(v * 1000, 1) for k, v in warmup_s.items()},
        "step_ms": {k: v * 1000 for k, v in times.items()}, "time_ratio": times["controlled"] / times["plain"],
        "first_controlled_ms": first_controlled * 1000,
        "first_over_warm": first_controlled / times["controlled"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
