"""Overload latency: what a refusal costs and what the surplus costs the admitted requests.

Against a running app configured as tests/integration/test_admission.py configures it
(`api.max_inflight_requests` 16; runs recorded before 2026-12-08 also had the Denoiser's
`max_queued_requests` at 4), three bursts in one run:

- alone: 16 generations at once (what the admitted take without a surplus);
- floor: 16 generations with 184 GETs of /v1/models beside them (the cheapest answer under that load);
- crowded: 200 generations at once (16 admitted, the rest refused with 503 and Retry-After).

Targets (issue: fast, informative rejections): 503 p99 at most 1 s, or at most 1.25x the floor's
p99 where any answer costs more than that on the machine; the admitted p50 at most 1.5x alone.
These are speed figures, so they live here and not in the test (which checks the answers' counts
and their Retry-After headers on every run).

    python benchmarks/bench_overload.py --url http://127.0.0.1:8000 --json overload.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.burst import MODELS, burst, percentile  # noqa: E402
from benchmarks.run_info import commit  # noqa: E402

REFUSAL_P99_S = 1.0
REFUSAL_OVER_FLOOR = 1.25
ADMITTED_SLOWDOWN = 1.5


def measure(url: str, admitted: int, surplus: int, timeout_s: float) -> dict:
    alone = asyncio.run(burst(url, admitted, timeout_s=timeout_s))
    floor = asyncio.run(burst(url, admitted, timeout_s=timeout_s, trivial=surplus - admitted))
    crowded = asyncio.run(burst(url, surplus, timeout_s=timeout_s))
    refusal_p99 = percentile(crowded.seconds(503), 99)
    floor_p99 = percentile(floor.seconds(200, MODELS), 99)
    admitted_p50, alone_p50 = percentile(crowded.seconds(200), 50), percentile(alone.seconds(200), 50)
    refusal_bound = max(REFUSAL_P99_S, REFUSAL_OVER_FLOOR * floor_p99)
    return {
        "bursts": {"alone": alone.summary(), "floor": floor.summary(), "crowded": crowded.summary()},
        "refusal_p99_s": refusal_p99, "floor_p99_s": floor_p99, "refusal_bound_s": refusal_bound,
        "refusal_met": refusal_p99 <= refusal_bound,
        "admitted_p50_s": admitted_p50, "alone_p50_s": alone_p50,
        "admitted_ratio": admitted_p50 / alone_p50, "admitted_met": admitted_p50 <= ADMITTED_SLOWDOWN * alone_p50,
        "load_average_per_core": os.getloadavg()[0] / (os.cpu_count() or 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--admitted", type=int, default=16, help="the app's api.max_inflight_requests")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    result = measure(args.url, args.admitted, args.requests, args.timeout)
    print(f"| 503 p99 (s) | bound (s) | floor p99 (s) | admitted p50 (s) | alone p50 (s) | ratio | load/core |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {result['refusal_p99_s']:.3f} | {result['refusal_bound_s']:.3f} | {result['floor_p99_s']:.3f} "
          f"| {result['admitted_p50_s']:.3f} | {result['alone_p50_s']:.3f} | {result['admitted_ratio']:.2f}x "
          f"| {result['load_average_per_core']:.1f} |")
    print(f"refusal target {'met' if result['refusal_met'] else 'NOT met'}; "
          f"admitted target {'met' if result['admitted_met'] else 'NOT met'}")
    if args.json:
        meta = {"commit": commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        Path(args.json).write_text(json.dumps({"meta": meta, **result}, indent=2))


if __name__ == "__main__":
    main()
