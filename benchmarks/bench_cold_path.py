"""No cold path: the first request at each of the 18 size presets and a first edit, against the same
again warm; and start-up, from deploy to ready, with each stage's replica from the controller's
request to its ready split into the worker process's start, the process before the constructor, and
the stage's phases (imports, load, optimize, compile and dynamo's part of it, warm-up:
`stats()["start_phases"]`, benchmarks/start_budget.py's table), and its compile counts (FX-graph cache
hits and misses), for a cold compile cache and then a warm one, and how long after ready the
Denoiser's batched graphs (compiled in the background) took.

    python benchmarks/bench_cold_path.py --json cold_path.json                       # H200, model=random
    python benchmarks/bench_cold_path.py --model tiny --device cpu --cpus 16 --gpus 1 --sizes 512x512,1024x1024 --steps 2

The app is serve_config.yaml with model and device changed (benchmarks/bench_serve.py's app_config).
Start 1 uses a fresh ZIMAGE_CACHE_DIR (cold: nothing compiled or cached), start 2 the same directory
in a fresh Ray instance (warm: what a new replica on a node that served before gets).
Target: first / warm <= 1.5 at every size.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.served_app import APP, STAGES, Recorder, app_config, app_parser, deploy, local_serve, stage_stats, start_recording  # noqa: E402
from benchmarks.start_budget import format_replicas, replica_rows_from_stats, replica_start_times  # noqa: E402
from deployments.geometry import SIZE_PRESETS  # noqa: E402

TARGET_RATIO = 1.5


def timed_post(client: httpx.Client, path: str, **kwargs) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = client.post(path, **kwargs)
    elapsed_ms = (time.perf_counter() - start) * 1000
    response.raise_for_status()
    return elapsed_ms, response


def request_pass(client: httpx.Client, sizes: list[str], steps: int, upload: bytes) -> dict[str, float]:
    """One request at each size, then one edit: milliseconds each, client side."""
    times = {}
    for size in sizes:
        body = {"prompt": "a lighthouse on a rocky coast at dusk", "size": size, "seed": 1,
                "num_inference_steps": steps}
        times[size], _ = timed_post(client, "/v1/images/generations", json=body)
        print(f"  {size:<10} {times[size]:9.1f} ms", flush=True)
    edit = {"prompt": "the same lighthouse as an oil painting", "size": "1024x1024", "seed": 1,
            "num_inference_steps": str(steps), "strength": "0.6"}
    times["edit 1024x1024"], _ = timed_post(client, "/v1/images/edits", data=edit,
                                            files={"image": ("in.png", upload, "image/png")})
    print(f"  {'edit':<10} {times['edit 1024x1024']:9.1f} ms", flush=True)
    return times


def upload_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((1024, 1024)).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def one_start(args, label: str, recorder: Recorder, with_requests: bool) -> None:
    started = time.perf_counter()
    with local_serve(args, args.gpus) as url:
        ray_s = time.perf_counter() - started
        ready_s = deploy(app_config(args))
        stages = {name: stage_stats(name) for name in STAGES}
        start = {"ray_start_s": round(ray_s, 2), "deploy_to_ready_s": round(ready_s, 2),
                 "phases": {name: s.get("start_phases") for name, s in stages.items()},
                 "replicas": replica_rows_from_stats(stages, replica_start_times(APP)),
                 "compile": {name: s.get("compile") for name, s in stages.items()},
                 "compile_cache": {name: s.get("compile_cache") for name, s in stages.items()}}
        recorder.put(f"start/{label}", start)
        start["denoiser_constructor_s"] = stages["Denoiser"].get("load_seconds")
        print(f"\nstart ({label} cache): ready {ready_s:.1f} s after deploy (Ray {ray_s:.1f} s); "
              f"Denoiser constructor {start['denoiser_constructor_s'] or 0:.1f} s (target 30 s with a warm cache)")
        print(format_replicas(start["replicas"]))
        for name, counts in start["compile"].items():
            print(f"  {name:<12} compile: {counts}")
        if not with_requests:
            start["batched"] = wait_for_batched_graphs()
        recorder.put(f"start/{label}", start)
        if with_requests:
            upload = upload_png()
            with httpx.Client(base_url=url, timeout=900) as client:
                print("first requests:")
                first = request_pass(client, args.sizes, args.steps, upload)
                print("warm requests:")
                warm = request_pass(client, args.sizes, args.steps, upload)
            rows = [{"size": k, "first_ms": round(first[k], 1), "warm_ms": round(warm[k], 1),
                     "ratio": round(first[k] / warm[k], 2)} for k in first]
            recorder.put("requests", rows)
            print(f"\n{'size':<16} {'first ms':>10} {'warm ms':>10} {'ratio':>7}")
            for row in rows:
                flag = "" if row["ratio"] <= TARGET_RATIO else f"  over {TARGET_RATIO}x"
                print(f"{row['size']:<16} {row['first_ms']:>10.1f} {row['warm_ms']:>10.1f} {row['ratio']:>7.2f}{flag}")
            recorder.put("over_target", [r["size"] for r in rows if r["ratio"] > TARGET_RATIO])
            start["batched"] = wait_for_batched_graphs()  # the first requests may have run before them
            recorder.put(f"start/{label}", start)


def wait_for_batched_graphs(timeout_s: float = 600) -> dict:
    """Polls the Denoiser until its batched graphs (compiled after ready, in the background) are ready:
    the seconds from now, and its `batched_warmup` stats."""
    started = time.perf_counter()
    while True:
        stats = stage_stats("Denoiser")
        warmup = stats.get("batched_warmup") or {}
        if stats.get("batched_graphs_ready") or warmup.get("error") or time.perf_counter() - started > timeout_s:
            break
        time.sleep(1.0)
    result = {"ready": bool(stats.get("batched_graphs_ready")), "waited_s": round(time.perf_counter() - started, 1),
              "warmup_after_ready_s": (stats.get("start_phases") or {}).get("warmup_after_ready_s"), **warmup}
    print(f"  Denoiser batched graphs: ready={result['ready']} after {result['waited_s']} s more "
          f"(model thread {result.get('lane_s')} s, {result.get('calls_done')}/{result.get('calls')} calls, "
          f"wall {result.get('wall_s')} s, error {result.get('error')})")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = app_parser(__doc__, "cold_path.json")
    parser.add_argument("--gpus", type=int, default=None, help="Ray's GPUs (default: detected; on a CPU smoke run, "
                        "1 lets the file's GPU shares place while the replicas run on the CPU)")
    parser.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZE_PRESETS))
    parser.add_argument("--cache-dir", default=None, help="ZIMAGE_CACHE_DIR; default: a fresh directory (cold)")
    parser.add_argument("--starts", default="cold,warm", help="which starts to run, in order")
    args = parser.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.one_gpu = False  # app_config's option; the shipped autoscaling stays as it is
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="zimage-cold-")
    os.environ["ZIMAGE_CACHE_DIR"] = cache_dir  # replicas inherit it from the Ray instance this starts
    recorder = start_recording(args, cache_dir=cache_dir)
    for index, label in enumerate(s for s in args.starts.split(",") if s):
        one_start(args, label, recorder, with_requests=index == 0)


if __name__ == "__main__":
    main()
