"""Load generator for `POST /v1/images/generations` (OpenAI images API shape).

Two load shapes:
- closed loop (`--concurrency N`): N clients each send their next request as soon as the last one
  returns, which measures the best throughput at a fixed number of requests in flight;
- open loop (`--rate R`): requests arrive as a Poisson process at R per second whatever the server
  does, which shows latency at a given offered load. In-flight requests are capped (`--max-in-flight`);
  an arrival that finds the cap reached is dropped and counted, so overload shows instead of hiding
  in a client-side queue.

Prompts come from a file (`--prompts`, one a line), or with `--fresh-prompts` every request gets one
never sent before, with the length of one drawn from the file (fresh.py): real traffic rarely repeats
a prompt, and a server may cache by prompt or by its length. `--loras a,b,c` gives each request one
of those LoRA adapters (the `loras` extension field), picked uniformly and seeded, at `--lora-scale`.
`--control-fraction F` gives a share F of the requests a control image (a server with a ControlNet:
`control_image`, `control_scale`, and `control_preprocess: canny` unless `--control-preprocess none`),
picked seeded; control.py makes the default image, `--control-image` sends a file.

Every 200 is checked (JSON shape, image count, base64 that decodes to PNG/JPEG/WebP bytes); a
malformed 200 counts as an error. Warm-up requests run first, as their own phase, and are left out
of every figure. When a response carries our server's non-standard `timings` object (milliseconds
per stage), the report gives the median of each field and of the time spent outside the server
(client latency - `total_ms`: HTTP, JSON, base64, proxies); other servers simply have no such figures.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --concurrency 8 --duration 60 \
        --size-mix "1024x1024:0.7,512x512:0.3" --slo-ms 5000 --json out.json
"""

from __future__ import annotations

from benchmarks.loadgen.cli import main
from benchmarks.loadgen.client import check_response, run_load
from benchmarks.loadgen.config import (
    LoadConfig,
    SizeWeight,
    load_prompts,
    parse_loras,
    parse_size,
    parse_size_mix,
)
from benchmarks.loadgen.report import (
    LatencyStats,
    LoadReport,
    RequestRecord,
    build_report,
    goodput,
    percentile,
)

__all__ = [
    "LatencyStats",
    "LoadConfig",
    "LoadReport",
    "RequestRecord",
    "SizeWeight",
    "build_report",
    "check_response",
    "goodput",
    "load_prompts",
    "main",
    "parse_loras",
    "parse_size",
    "parse_size_mix",
    "percentile",
    "run_load",
]
