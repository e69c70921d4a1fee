"""ControlNet on the serving path, in one process on one device: each figure against its target, met or
not, printed as a table and written as JSON with the device, date and commit.

The stages are the deployments' own classes built from the model settings with every speed setting
`auto` (benchmarks/local_app.py), so `auto` resolves here as it does in a replica (on an H100/H200:
FP8 with the fused kernels, regional compile, CUDA graphs; on a CPU: float32 eager) and the Denoiser
loads, optimizes, warms up and runs control exactly as served; nothing here builds a path of its own.
Requests go through the handle API's planning and the Ingress's pipeline (no HTTP). In this order:

  first    each stage ready and its warm-ups after ready done, one plain request at the first size
           (the prompt and the plain path warm), then at each of `--first-sizes` (1024x1024 and a
           non-square preset) the first controlled request (an edge map, scale 0.75) against the
           same request again (median of `--repeats`): target at most 1.3x;
  inpaint  1 client: an inpainting edit with control (upload, mask and control image, fitted and
           encoded by the VAE) at `--size` against a plain generation at that size, p50 of
           `--requests` each, interleaved: target at most 1.7x;
  step     the Denoiser's loop, one image at `--size` with a `--caption-tokens` caption: a step of a
           controlled job (random control latents, scale 0.75) against a plain one (median of
           `--repeats` jobs of `--steps` steps), with the CUDA-graph replays on each side counted
           from the Denoiser's own graphs (`step_graphs`), beside the FLOP ratio of the two forwards
           counted by torch's FlopCounterMode on the meta device (no device work): target at most 1.6x.

    python benchmarks/bench_controlnet.py --json benchmarks/results/controlnet.json      # one GPU, `random`
    python benchmarks/bench_controlnet.py --device cpu --model tiny --controlnet tiny --size 512 \\
        --first-sizes 512x512,640x512 --steps 1 --repeats 1 --requests 1 --json /tmp/controlnet.json  # smoke
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.local_app import LocalApp  # noqa: E402
from benchmarks.run_info import commit  # noqa: E402
from deployments.geometry import format_size, parse_size  # noqa: E402
from serve_app.protocol import ImageRequest  # noqa: E402

TARGETS = {"step": 1.6, "first": 1.3, "inpaint": 1.7}  # issue 31's figures, as ratios to the plain path
PROMPT = "a lighthouse on a rocky coast at dusk, waves breaking below"
SCALE = 0.75


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--model", default="random")
    p.add_argument("--controlnet", default="random")
    p.add_argument("--cache-dir", default=None, help="the model settings' cache_dir (compiled artifacts too)")
    p.add_argument("--size", type=int, default=1024, help="square side of the step and inpaint figures")
    p.add_argument("--first-sizes", default="1024x1024,1344x768", help="sizes of the first-request figure")
    p.add_argument("--steps", type=int, default=8, help="steps per request and per timed job")
    p.add_argument("--caption-tokens", type=int, default=160)
    p.add_argument("--repeats", type=int, default=5, help="warm requests per size; timed jobs per side")
    p.add_argument("--requests", type=int, default=10, help="1-client requests per side of the inpaint figure")
    p.add_argument("--warm-timeout", type=float, default=1200, help="seconds to wait for a stage's warm-ups after ready")
    p.add_argument("--json", default="controlnet.json")
    args = p.parse_args(argv)
    args.first_sizes = [parse_size(size) for size in args.first_sizes.split(",") if size.strip()]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --device cpu --model tiny --controlnet tiny for a smoke run")
    return args


# ---- inputs


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def edge_map(width: int, height: int) -> bytes:
    """A control image as a canny map looks: white lines on black."""
    values = np.zeros((height, width), np.uint8)
    values[height // 3, :] = values[:, width // 4] = values[:, 3 * width // 5] = 255
    values[2 * height // 3, width // 8 : 7 * width // 8] = 255
    return png(Image.fromarray(values).convert("RGB"))


def photo_and_mask(side: int) -> tuple[bytes, bytes]:
    """An upload (a gradient with shapes) and its mask (white = edit: a centred rectangle)."""
    photo = Image.linear_gradient("L").resize((side, side)).convert("RGB")
    ImageDraw.Draw(photo).ellipse((side // 5, side // 5, side // 2, side // 2), fill=(200, 60, 40))
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).rectangle((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=255)
    return png(photo), png(mask)


# ---- figures


def first_requests(app: LocalApp, args: argparse.Namespace) -> list[dict]:
    """Per size: the first controlled request after ready, then the same request warm."""
    width, height = args.first_sizes[0]
    app.request(ImageRequest(prompt=PROMPT, width=width, height=height, steps=args.steps, seed=0))
    rows = []
    for width, height in args.first_sizes:
        request = ImageRequest(prompt=PROMPT, width=width, height=height, steps=args.steps, seed=1,
                               control_image=edge_map(width, height), control_scale=SCALE)
        first_s = app.request(request)[1]
        warm_s = statistics.median(app.request(request)[1] for _ in range(args.repeats))
        rows.append({"size": format_size(width, height), "first_ms": first_s * 1000, "warm_ms": warm_s * 1000,
                     "ratio": first_s / warm_s})
        print(f"first controlled request {rows[-1]['size']}: {first_s * 1000:.1f} ms, warm {warm_s * 1000:.1f} ms "
              f"({first_s / warm_s:.2f}x)", flush=True)
    return rows


def inpaint_against_plain(app: LocalApp, args: argparse.Namespace) -> dict:
    """1-client p50 of an inpainting edit with control against a plain generation, interleaved."""
    side = args.size
    upload, mask = photo_and_mask(side)

    def requests(seed: int) -> dict[str, ImageRequest]:
        return {"plain": ImageRequest(prompt=PROMPT, width=side, height=side, steps=args.steps, seed=seed),
                "edit": ImageRequest(prompt=PROMPT, steps=args.steps, seed=seed, init_image=upload, mask=mask,
                                     control_image=edge_map(side, side), control_scale=SCALE)}

    for request in requests(0).values():  # one of each first, left out
        app.request(request)
    times: dict[str, list[float]] = {"plain": [], "edit": []}
    for seed in range(1, args.requests + 1):
        for name, request in requests(seed).items():
            times[name].append(app.request(request)[1] * 1000)
    p50 = {name: statistics.median(values) for name, values in times.items()}
    return {"size": format_size(side, side), "plain_p50_ms": p50["plain"], "edit_p50_ms": p50["edit"],
            "ratio": p50["edit"] / p50["plain"], "requests": args.requests}


def step_times(app: LocalApp, args: argparse.Namespace) -> dict:
    """A plain and a controlled step through the Denoiser's own loop, and the graph replays of each."""
    from deployments.contracts import ControlLatents, DenoiseJob

    denoiser = app.stage("denoiser")
    generator = torch.Generator("cpu").manual_seed(0)
    caption = torch.randn(args.caption_tokens, denoiser.transformer.config.cap_feat_dim, generator=generator)
    control = denoiser.control.context(
        ControlLatents(torch.randn(1, 16, args.size // 8, args.size // 8, generator=generator)), SCALE)
    jobs = {name: DenoiseJob(caption=caption, width=args.size, height=args.size, steps=args.steps, seed=0,
                             control=control if name == "controlled" else None) for name in ("plain", "controlled")}

    def job_s(job: DenoiseJob) -> float:
        def run() -> float:
            if denoiser.device.type == "cuda":
                torch.cuda.synchronize(denoiser.device)
            started = time.perf_counter()
            denoiser.loop.run([job])
            if denoiser.device.type == "cuda":
                torch.cuda.synchronize(denoiser.device)
            return time.perf_counter() - started

        return denoiser.gpu_lane.run_blocking(run)

    out: dict = {"size": format_size(args.size, args.size), "caption_tokens": args.caption_tokens, "steps": args.steps}
    for name, job in jobs.items():
        for _ in range(2):  # first sight and capture of the shape (`dit.step_graphs`), then replays
            job_s(job)
        before = graph_counts(denoiser)
        median_s = statistics.median(job_s(job) for _ in range(args.repeats))
        after = graph_counts(denoiser)
        out[f"{name}_step_ms"] = median_s * 1000 / args.steps
        out[f"{name}_graphs"] = None if after is None else {k: after[k] - before[k] for k in after}
    out["ratio"] = out["controlled_step_ms"] / out["plain_step_ms"]
    out["flops"] = count_flops(denoiser, args.size, args.caption_tokens)
    return out


def graph_counts(denoiser) -> dict[str, int] | None:
    """The Denoiser's CUDA-graph counters (None where it replays none: `dit_cuda_graphs` off, the CPU)."""
    if denoiser.step_graphs is None:
        return None
    return {k: v for k, v in denoiser.step_graphs.as_dict().items() if isinstance(v, int) and not isinstance(v, bool)}


def count_flops(denoiser, size: int, caption_tokens: int) -> dict:
    """FLOPs of one plain and one controlled forward at batch 1, by torch's FlopCounterMode over the
    Denoiser's DiT and ControlNet configs rebuilt on the meta device: what the forwards compute, not
    how fast any kernel runs."""
    from diffusers import ZImageControlNetModel, ZImageTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from deployments.denoiser.control import ControlContext, ControlNetRunner, control_context

    meta = torch.device("meta")
    with meta:
        transformer = ZImageTransformer2DModel.from_config(denoiser.transformer.config)
        controlnet = ZImageControlNetModel.from_config(denoiser.controlnet.config)
    runner = ControlNetRunner(controlnet, transformer)
    latents = [torch.zeros(16, 1, size // 8, size // 8, device=meta)]
    t, captions = torch.tensor([0.5], device=meta), [torch.zeros(caption_tokens, transformer.config.cap_feat_dim,
                                                                 device=meta)]
    context = ControlContext(control_context(torch.zeros(1, 16, size // 8, size // 8), runner.in_dim).to(meta), SCALE)
    flops = {}
    for name in ("plain", "controlled"):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            if name == "plain":
                transformer(latents, t, captions, return_dict=False)
            else:
                runner.forward(latents, t, captions, [context])
        flops[f"{name}_gflop"] = counter.get_total_flops() / 1e9
    flops["ratio"] = flops["controlled_gflop"] / flops["plain_gflop"]
    return flops


# ---- report


def verdicts(result: dict) -> list[dict]:
    rows = [{"figure": f"first controlled request / warm, {row['size']}", "ratio": row["ratio"],
             "target": TARGETS["first"]} for row in result["first"]]
    rows.append({"figure": f"inpaint edit with control / plain generation, 1-client p50, {result['inpaint']['size']}",
                 "ratio": result["inpaint"]["ratio"], "target": TARGETS["inpaint"]})
    step = result["step"]
    rows.append({"figure": f"controlled / plain DiT step, batch 1, {step['size']} (FLOPs {step['flops']['ratio']:.2f}x)",
                 "ratio": step["ratio"], "target": TARGETS["step"]})
    for row in rows:
        row["met"] = row["ratio"] <= row["target"]
    return rows


def print_table(result: dict) -> None:
    meta = result["meta"]
    print(f"\ndevice {meta['device']} | model {meta['model']} | controlnet {meta['controlnet']} | commit "
          f"{meta['commit']} | {meta['date']}\nDenoiser: {meta['denoiser_speed']}")
    print("start, s: " + ", ".join(f"{name} ready {s['ready_s']:.1f} + warm {s['warm_after_ready_s']:.1f}"
                                   for name, s in result["start_s"].items()))
    width = max(len(row["figure"]) for row in result["verdicts"])
    print(f"{'figure':<{width}}  {'ratio':>7}  {'target':>7}")
    for row in result["verdicts"]:
        print(f"{row['figure']:<{width}}  {row['ratio']:>6.2f}x  {'<= ' + format(row['target'], '.1f'):>6}x  "
              f"{'met' if row['met'] else 'NOT MET'}")
    step = result["step"]
    print(f"step ms: plain {step['plain_step_ms']:.1f}, controlled {step['controlled_step_ms']:.1f}; graph counters "
          f"during the timed jobs: plain {step['plain_graphs']}, controlled {step['controlled_graphs']}")
    print(f"inpaint p50 ms: plain {result['inpaint']['plain_p50_ms']:.1f}, edit {result['inpaint']['edit_p50_ms']:.1f}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = {"model": args.model, "controlnet": args.controlnet, "device": args.device}
    if args.cache_dir:
        settings["cache_dir"] = args.cache_dir
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    app = LocalApp(settings, args.warm_timeout)
    try:
        denoiser = app.stage("denoiser")
        result: dict = {
            "meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
                     "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                     "torch": torch.__version__, "model": args.model, "controlnet": args.controlnet,
                     "denoiser_speed": denoiser.speed.describe(denoiser.speed_keys),
                     "args": {k: str(v) for k, v in vars(args).items()}},
            "start_s": app.start_s,
        }
        for name, figure in (("first", first_requests), ("inpaint", inpaint_against_plain), ("step", step_times)):
            result[name] = figure(app, args)
            out.write_text(json.dumps(result, indent=2))  # after each figure: a run cut short keeps its data
        result["step_graphs"] = None if denoiser.step_graphs is None else denoiser.step_graphs.as_dict()
    finally:
        app.close()
    result["verdicts"] = verdicts(result)
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
