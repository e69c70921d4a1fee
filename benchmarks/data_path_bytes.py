"""Bytes a request moves between replicas (through Ray's object store), per 1024x1024 image, before and
after stage outputs were passed straight to the next stage. Computed from the real objects, on a CPU:

    python benchmarks/data_path_bytes.py --n 1,4 --json data_path_bytes.json

Sizes are the pickled size (protocol 5, as Ray serializes Python objects; tensors travel as their
raw buffers) of CaptionEmbedding (160 tokens x 2560; bf16 as the GPU text encoder returns it:
`hidden.to("cpu")` keeps the model dtype, float32 on a CPU), Latents, DecodedImage (uint8) and
LatentPosterior (edits). A leg is one copy of an object from one replica to another:
  before  every tensor through the Ingress: caption in once and out to each image's Denoiser call,
          latents in from the Denoiser and out to the VaeDecoder, pixels in;
  after   handle responses passed on: caption from the TextEncoder to each Denoiser call, latents
          from the Denoiser to the VaeDecoder, pixels to the Ingress.
A Denoiser call reads the caption from the object store of its node: with all of a request's images
on one node the caption crosses the network once, here it is counted once per image (the most).
Also printed: what encoding the output image on the VaeDecoder would send instead of raw pixels.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_info import commit  # noqa: E402
from deployments.contracts import (  # noqa: E402
    CaptionEmbedding, DecodedImage, ImageTrace, LatentPosterior, Latents, StageTime,
)
from deployments.geometry import latent_shape  # noqa: E402
from serve_app.image_io import encode_output  # noqa: E402

WIDTH = HEIGHT = 1024
CAPTION_TOKENS, HIDDEN, LATENT_CHANNELS = 160, 2560, 16


def nbytes(obj) -> int:
    return len(pickle.dumps(obj, protocol=5))


def objects(caption_dtype: torch.dtype) -> dict[str, object]:
    shape = latent_shape(LATENT_CHANNELS, WIDTH, HEIGHT)
    return {
        "caption": CaptionEmbedding(embedding=torch.randn(CAPTION_TOKENS, HIDDEN).to(caption_dtype),
                                    num_tokens=CAPTION_TOKENS, truncated=False,
                                    trace=ImageTrace(encode=StageTime(6.0, 0.5))),
        "latents": Latents(latents=torch.randn(shape), width=WIDTH, height=HEIGHT, steps_run=8),
        "pixels": DecodedImage(pixels=torch.randint(0, 256, (HEIGHT, WIDTH, 3), dtype=torch.uint8), width=WIDTH,
                               height=HEIGHT),
        "posterior": LatentPosterior(mean=torch.randn(shape), std=torch.rand(shape), shift_factor=0.1159,
                                     scaling_factor=0.3611),
    }


def legs(n: int, edit: bool) -> dict[str, dict[str, int]]:
    """Copies of each object per request of n images: {path: {object: copies}}."""
    before = {"caption": 1 + n, "latents": 2 * n, "pixels": n}
    after = {"caption": n, "latents": n, "pixels": n}
    if edit:
        before["posterior"], after["posterior"] = 1 + n, n
    return {"before": before, "after": after}


def smooth_image() -> np.ndarray:
    """A photo-like stand-in (gradients and soft shapes; random weights give noise, which no codec shrinks)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32) / WIDTH
    r = 0.5 + 0.5 * np.sin(6 * x + 3 * y)
    g = 0.5 + 0.5 * np.cos(4 * y - 2 * x * y)
    b = np.exp(-((x - 0.6) ** 2 + (y - 0.4) ** 2) * 8)
    image = np.stack([r, g, b], -1) * 235 + np.random.default_rng(0).normal(0, 4, (HEIGHT, WIDTH, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="1,4", help="images per request, comma separated")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result: dict = {"commit": commit(), "size": f"{WIDTH}x{HEIGHT}", "objects": {}, "requests": []}
    for label, dtype in (("gpu (bf16 caption)", torch.bfloat16), ("cpu (float32 caption)", torch.float32)):
        sizes = {name: nbytes(obj) for name, obj in objects(dtype).items()}
        result["objects"][label] = sizes
        print(f"\n{label}: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sizes.items()))
        print(f"  {'request':<16} {'before MiB':>11} {'after MiB':>10} {'after/before':>13} {'MiB/image after':>16}")
        for n in (int(v) for v in args.n.split(",")):
            for edit in (False, True):
                totals = {path: sum(sizes[obj] * count for obj, count in copies.items())
                          for path, copies in legs(n, edit).items()}
                name = f"n={n}{' edit' if edit else ''}"
                print(f"  {name:<16} {totals['before'] / 2**20:>11.2f} {totals['after'] / 2**20:>10.2f} "
                      f"{totals['after'] / totals['before']:>13.2f} {totals['after'] / n / 2**20:>16.2f}")
                result["requests"].append({"device": label, "n": n, "edit": edit, **totals})
    pixels = torch.from_numpy(smooth_image())
    noise = torch.randint(0, 256, (HEIGHT, WIDTH, 3), dtype=torch.uint8)
    raw = nbytes(DecodedImage(pixels=pixels, width=WIDTH, height=HEIGHT))
    print(f"\noutput encoded on the VaeDecoder instead of raw uint8 pixels ({raw / 2**20:.2f} MiB):")
    result["encoded_output"] = {}
    for fmt in ("png", "jpeg", "webp"):
        smooth, random_weights = len(encode_output(pixels, fmt, None)), len(encode_output(noise, fmt, None))
        result["encoded_output"][fmt] = {"smooth": smooth, "noise": random_weights}
        print(f"  {fmt:<5} smooth image {smooth / 2**20:6.2f} MiB ({smooth / raw:4.0%} of raw); "
              f"random-weights noise {random_weights / 2**20:6.2f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
