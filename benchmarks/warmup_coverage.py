"""Does anything still compile, or stall, after the Denoiser's warm-up? Random batches, one step each.

    python benchmarks/warmup_coverage.py --json coverage.json        # H200, model `random`, FP8

Prepares the DiT exactly as the Denoiser does (`optimize_transformer`, then `warm_for_serving`), on
one thread as the Denoiser's lane, then runs `--batches` random batches through `DenoiseLoop.step`:
sizes from `--sizes`, 1 to `--max-batch` jobs, caption lengths 8 to 300 tokens. Each batch shape
runs twice; for each run it records the step time and whether dynamo compiled a graph (its
`unique_graphs` counter). A first run much slower than its repeat, without a compile, points at
per-shape work outside inductor (for example cuDNN building an attention plan). Prints the slow
steps and a summary; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from benchmarks.harness import cuda_missing  # noqa: E402
from benchmarks.run_info import commit  # noqa: E402
from deployments.weights import loading  # noqa: E402
from deployments.denoiser.dit import optimize, warmup  # noqa: E402
from deployments.contracts import DenoiseJob  # noqa: E402
from deployments.denoiser.loop import DenoiseLoop  # noqa: E402
from deployments.weights.model_source import resolve_model_source  # noqa: E402


def timed_step(loop: DenoiseLoop, jobs: list[DenoiseJob]) -> tuple[float, int]:
    states = [loop.start(job) for job in jobs]
    graphs = counters["stats"]["unique_graphs"]
    torch.cuda.synchronize()
    start = time.perf_counter()
    loop.step(states)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000, counters["stats"]["unique_graphs"] - graphs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random")
    p.add_argument("--precision", default="fp8", choices=["bf16", "fp8"])
    p.add_argument("--sizes", default="512,1024", help="square sizes, comma separated (also the warm-up sizes)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-caption-tokens", type=int, default=512, help="the Denoiser's max_prompt_tokens")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if cuda_missing("warmup_coverage.py"):
        return 2
    device, dtype = torch.device("cuda"), torch.bfloat16
    source = resolve_model_source(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="zimage-coverage-")
    transformer = loading.load_transformer(source, device, dtype)
    optimize.optimize_transformer(transformer, args.precision, compile=True, cache_dir=cache_dir, attention="cudnn")
    t0 = time.perf_counter()
    warm = warmup.warm_for_serving(transformer, sizes, args.max_batch, args.max_caption_tokens)
    warmup_s = time.perf_counter() - t0
    loop = DenoiseLoop(transformer, loading.load_scheduler(source), device, dtype)
    rng = random.Random(args.seed)
    cap_dim = transformer.config.cap_feat_dim
    rows = []
    for index in range(args.batches):
        size = rng.choice(sizes)
        lengths = [rng.randint(8, 300) for _ in range(rng.randint(1, args.max_batch))]
        jobs = [DenoiseJob(caption=torch.randn(n, cap_dim), width=size, height=size, steps=8, seed=index)
                for n in lengths]
        first_ms, first_graphs = timed_step(loop, jobs)
        again_ms, again_graphs = timed_step(loop, jobs)
        rows.append({"size": size, "caption_lengths": lengths, "first_ms": round(first_ms, 2),
                     "repeat_ms": round(again_ms, 2), "graphs_compiled": first_graphs + again_graphs})
        flag = "  <-- slow first run" if first_ms > 2 * again_ms + 20 else ""
        print(f"{index:3d} {size:5d} b{len(lengths)} caps {lengths}: first {first_ms:8.1f} ms, "
              f"repeat {again_ms:7.1f} ms, graphs compiled {first_graphs + again_graphs}{flag}", flush=True)
    slow = [r for r in rows if r["first_ms"] > 2 * r["repeat_ms"] + 20]
    summary = {
        "device": torch.cuda.get_device_name(),
        "commit": commit(),
        "torch": torch.__version__,
        "warmup_s": round(warmup_s, 1),
        "warmup": warm,
        "batches": len(rows),
        "graphs_compiled_after_warmup": sum(r["graphs_compiled"] for r in rows),
        "slow_first_runs": len(slow),
        "slow_first_extra_ms_total": round(sum(r["first_ms"] - r["repeat_ms"] for r in slow), 1),
        "median_repeat_ms": statistics.median(r["repeat_ms"] for r in rows),
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
