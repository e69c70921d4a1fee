"""`zimage-generate`: one image from the command line, through the same stage code the server runs."""

from __future__ import annotations

import argparse
import logging

import torch

from deployments.weights.loading import resolve_device
from deployments.geometry import parse_size
from deployments.local_pipeline import GenerationSpec, LocalPipeline
from deployments.weights.model_source import resolve_model_source


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate one image with Z-Image-Turbo (no server).")
    parser.add_argument("prompt")
    parser.add_argument("--model", default="tiny", help="hub id, local directory, 'tiny' or 'random'")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--size", default="512x512", help="WxH, multiples of 16 in 512..2048")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", default=None)
    parser.add_argument("--out", default="image.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    width, height = parse_size(args.size)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipeline = LocalPipeline(resolve_model_source(args.model), device, dtype)
    spec = GenerationSpec(args.prompt, width, height, steps=args.steps, seed=args.seed, style=args.style)
    image = pipeline.generate([spec])[0]
    from PIL import Image

    Image.fromarray(image.pixels.numpy()).save(args.out)
    print(f"wrote {args.out} ({width}x{height}, seed {args.seed})")


if __name__ == "__main__":
    main()
