"""The command line: flags to a `LoadConfig`, run it, print the table, write the JSON."""

from __future__ import annotations

import argparse
import asyncio

from benchmarks.loadgen.client import run_load
from benchmarks.loadgen.control import load_control_image
from benchmarks.loadgen.config import (
    DEFAULT_PATH,
    DEFAULT_PROMPTS,
    DEFAULT_URL,
    LoadConfig,
    load_prompts,
    parse_loras,
    parse_size_mix,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen",
        description="Load generator for an OpenAI-style POST /v1/images/generations endpoint.",
    )
    p.add_argument("--url", default=DEFAULT_URL, help="server base URL (default %(default)s)")
    p.add_argument("--path", default=DEFAULT_PATH, help="endpoint path (default %(default)s)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--model", default=None, help="'model' field of the body; omitted when not given")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=int, help="closed loop: N clients sending back to back")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals at R requests/s")
    p.add_argument("--max-in-flight", type=int, default=64, help="open loop: cap on requests in flight")
    p.add_argument("--duration", type=float, default=None, help="stop sending after S seconds")
    p.add_argument("--requests", type=int, default=None, help="stop after K measured requests (arrivals)")
    p.add_argument("--warmup", type=int, default=0, help="K warm-up requests first, left out of the figures")
    p.add_argument("--size-mix", default="1024x1024", help='weighted sizes, e.g. "1024x1024:0.7,512x512:0.3"')
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (server default when absent)")
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--seed-base", type=int, default=0, help="request i uses seed SEED_BASE + i*n")
    p.add_argument("--no-seed", action="store_true", help="send no seed: the server picks one")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompt file, one per line")
    p.add_argument("--fresh-prompts", action="store_true",
                   help="every request a new prompt, each a drawn prompt's length in words with other words of the set")
    p.add_argument("--shuffle-seed", type=int, default=0, help="drives prompt/size choice and arrivals")
    p.add_argument("--loras", default="", help='adapter names, e.g. "ink,watercolor": each request uses one, '
                   "picked uniformly at random (seeded by --shuffle-seed); sizes, prompts and seeds stay those of "
                   "the run without adapters")
    p.add_argument("--lora-scale", type=float, default=1.0, help="the adapter's scale, -2..2 (default %(default)s)")
    p.add_argument("--control-fraction", type=float, default=0.0,
                   help="the share of requests with a control image, 0..1 (a server with a ControlNet); which "
                        "requests is drawn from --shuffle-seed, sizes, prompts and seeds stay those of the run without")
    p.add_argument("--control-image", default=None,
                   help="the control image they send (PNG/JPEG/WebP); default: a photo-like 1024x1024 JPEG")
    p.add_argument("--control-preprocess", choices=("canny", "none"), default="canny",
                   help="canny: the server makes the edge map (default); none: the image is the control map")
    p.add_argument("--control-scale", type=float, default=0.75, help="0..2 (default %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    p.add_argument("--slo-ms", type=float, default=None, help="latency objective for goodput")
    p.add_argument("--json", dest="json_out", default=None, help="write the full report to this file")
    p.add_argument("--label", default="", help="name of this run in the report")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    requests = args.requests
    if args.duration is None and requests is None:
        requests = 100
    return LoadConfig(
        url=args.url,
        path=args.path,
        api_key=args.api_key,
        model=args.model,
        concurrency=args.concurrency,
        rate=args.rate,
        max_in_flight=args.max_in_flight,
        duration_s=args.duration,
        requests=requests,
        warmup=args.warmup,
        size_mix=parse_size_mix(args.size_mix),
        steps=args.steps,
        n=args.n,
        seed_base=None if args.no_seed else args.seed_base,
        prompts=load_prompts(args.prompts),
        fresh_prompts=args.fresh_prompts,
        timeout_s=args.timeout,
        slo_ms=args.slo_ms,
        label=args.label,
        shuffle_seed=args.shuffle_seed,
        loras=parse_loras(args.loras),
        lora_scale=args.lora_scale,
        control_fraction=args.control_fraction,
        control_image=load_control_image(args.control_image) if args.control_fraction > 0 else None,
        control_preprocess=None if args.control_preprocess == "none" else args.control_preprocess,
        control_scale=args.control_scale,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        config.validate()
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    report = asyncio.run(run_load(config))
    print(report.format_table())
    if args.json_out:
        report.write_json(args.json_out)
        print(f"\nwrote {args.json_out}")
    return 0 if report.ok > 0 else 1
