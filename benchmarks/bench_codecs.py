"""Image output encoding: today's writer (`serve_app.image_io.encode_output`: our threaded PNG deflate,
Pillow for JPEG and WebP) against the `imagecodecs` package, at settings of comparable quality.

    python benchmarks/bench_codecs.py --json codecs.json
    python benchmarks/bench_codecs.py --sizes 512 --repeats 5     # quicker

For PNG, JPEG and WebP at each size and for two kinds of content (photo-like: smooth gradients and mild
noise; noise: every pixel random, as from random weights): the median time of one encode after
warm-up, the bytes, and the images per second when `--threads` threads encode at once, as the
server's encode pool does. PNG settings: zlib level 1 (ours) and imagecodecs' default; JPEG and WebP
at quality 90 (ours' default). Every PNG is decoded with Pillow and must give the input's pixels.
Needs no GPU and no Ray.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import PIL
import torch  # encode_output takes the tensor the VaeDecoder returns
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run_info import commit  # noqa: E402
from serve_app import image_io  # noqa: E402  (pydantic, numpy, torch, PIL: no Ray)


QUALITY = image_io.DEFAULT_LOSSY_QUALITY
PNG_LEVEL = image_io.PNG_COMPRESS_LEVEL

Encoder = Callable[[np.ndarray], bytes]


def ours(output_format: str) -> Encoder:
    return lambda pixels: image_io.encode_output(torch.from_numpy(pixels), output_format, None)


WRITERS: dict[str, dict[str, Encoder]] = {
    "png": {
        "ours": ours("png"),
        f"imagecodecs level {PNG_LEVEL}": lambda px: imagecodecs.png_encode(px, level=PNG_LEVEL),
        "imagecodecs default": lambda px: imagecodecs.png_encode(px),
    },
    "jpeg": {
        "ours": ours("jpeg"),
        "imagecodecs": lambda px: imagecodecs.jpeg8_encode(px, level=QUALITY),
    },
    "webp": {
        "ours": ours("webp"),
        "imagecodecs": lambda px: imagecodecs.webp_encode(px, level=QUALITY, lossless=False),
    },
}


def photo_like(size: int, seed: int) -> np.ndarray:
    """Smooth colour gradients and a few soft waves, plus mild sensor-like noise: compresses as a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    channels = []
    for _ in range(3):
        a, b, fx, fy, phase = rng.uniform(0.2, 1.0, 5) * (1, 1, 6, 6, 6)
        channels.append(0.5 + 0.25 * (a * x - b * y) + 0.2 * np.sin(fx * x + phase) * np.cos(fy * y))
    image = np.stack(channels, axis=-1) * 255 + rng.normal(0, 3, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def noise(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


CONTENTS: dict[str, Callable[[int, int], np.ndarray]] = {"photo": photo_like, "noise": noise}


def check_png(data: bytes, pixels: np.ndarray, writer: str) -> None:
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if not np.array_equal(decoded, pixels):
        raise AssertionError(f"PNG from {writer} does not decode to the input pixels")


def median_ms(encode: Encoder, pixels: np.ndarray, repeats: int, warmups: int) -> float:
    for _ in range(warmups):
        encode(pixels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode(pixels)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def images_per_s(encode: Encoder, pixels: np.ndarray, threads: int, per_thread: int) -> float:
    """Throughput of `threads` threads each encoding `per_thread` images back to back."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: encode(pixels), range(threads)))  # warm every thread
        start = time.perf_counter()
        list(pool.map(lambda _: [encode(pixels) for _ in range(per_thread)], range(threads)))
        return threads * per_thread / (time.perf_counter() - start)


def machine() -> dict[str, Any]:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "imagecodecs": imagecodecs.__version__,
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "png_threads_ours": image_io.PNG_WORKERS,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for output_format, writers in WRITERS.items():
        for size in args.sizes:
            for content, make in CONTENTS.items():
                pixels = make(size, args.seed)
                for writer, encode in writers.items():
                    data = encode(pixels)
                    if output_format == "png":
                        check_png(data, pixels, writer)
                    row = {
                        "format": output_format, "size": size, "content": content, "writer": writer,
                        "ms_p50": median_ms(encode, pixels, args.repeats, args.warmups),
                        "bytes": len(data),
                        "images_per_s_threads": images_per_s(encode, pixels, args.threads, args.repeats),
                    }
                    rows.append(row)
                    print(format_row(row), flush=True)
    return {"meta": {**machine(), "args": vars(args)}, "rows": rows}


HEADER = f"{'format':<6} {'size':>5} {'content':<7} {'writer':<22} {'ms p50':>8} {'bytes':>10} {'img/s':>8}"


def format_row(row: dict[str, Any]) -> str:
    return (f"{row['format']:<6} {row['size']:>5} {row['content']:<7} {row['writer']:<22} {row['ms_p50']:>8.2f} "
            f"{row['bytes']:>10} {row['images_per_s_threads']:>8.1f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="512,1024", help="square sizes in pixels, comma separated")
    p.add_argument("--repeats", type=int, default=10, help="timed encodes per figure, and per thread")
    p.add_argument("--warmups", type=int, default=2)
    p.add_argument("--threads", type=int, default=4, help="threads encoding at once for images/s")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"img/s: {args.threads} threads encoding at once; ours' PNG deflate also splits each image over "
          f"{image_io.PNG_WORKERS} threads")
    print(HEADER)
    print("-" * len(HEADER))
    results = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
