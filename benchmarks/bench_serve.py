"""End-to-end serving benchmark: the application from serve_config.yaml, driven over HTTP by loadgen,
against the plain diffusers baseline server driven by the same load generator in the same run.

    python benchmarks/bench_serve.py --json out.json                      # on an H200, model=random
    python benchmarks/bench_serve.py --model tiny --device cpu --quick    # smoke run on a CPU

Sections (each appends to the JSON as it finishes, so a timeout still leaves data):
  startup     time until every stage is ready; each stage's peak GPU memory
  single      one request at a time at 1024x1024: first request, then warm p50
  load        20 concurrent clients at 512, 1024 and a mixed size load, for each scheduling policy
  baseline    the same single-client and concurrent loads against benchmarks/baseline_server.py
With --fresh-prompts, each of our loads runs again with a prompt never sent before per request
(`single/fresh`, `load/<policy>/<load>/fresh`), beside the repeating set of prompts.txt.

With LoRA adapters (`--loras a,b,...` from the server's `lora_dir`, or `--lora-random N`: N random
rank `--lora-rank` adapters written for the run), after `lora_first` (for each adapter, one request
while the replica has never seen it and the same request again: the unseen adapter's cost), the
single-client run again with the first adapter (`single/lora`, its p50 as a ratio of the run without),
and each of our loads again with every request picking one adapter (loadgen's `--loras`, uniform and
seeded; `load/<policy>/<load>/loras`, with fresh prompts when `--fresh-prompts` is given, its
throughput as a ratio of the same load without adapters). `lora_targets` says which targets are met.
On the default path (every speed setting `auto`; on an H100/H200 the fused FP8 kernels, which apply
the adapters), one GPU, 20 clients at 1024x1024, each request one of 8 rank-32 adapters:

    python benchmarks/bench_serve.py --one-gpu --loads 1024 --lora-random 8 --lora-rank 32 --fresh-prompts \
        --skip-baseline --json benchmarks/results/serve_lora.json

Before the first measurement every stage's warm-up after ready has finished (`warm_after_ready_s`).

With `--control-fraction F` the app gets a ControlNet (`controlnet: random`, or `tiny` with the tiny
model, unless `--set controlnet=...` names one) and each of our loads runs again with a share F of
the requests carrying a control image (loadgen's `--control-fraction`: its photo-like default or
`--control-image`, canny preprocessing on the server unless `--control-preprocess none`), after the
load without control (`/fresh` with `--fresh-prompts`) and with its prompts: `load/<policy>/<load>/
control`, its throughput as a ratio of that load's; `control_targets` says whether the 1024x1024
loads' ratio meets its target (at least 0.75x). On one GPU (20 clients, 1024x1024, half the requests
controlled, fresh prompts):

    python benchmarks/bench_serve.py --one-gpu --loads 1024 --fresh-prompts --control-fraction 0.5 \
        --skip-baseline --json benchmarks/results/serve_control.json
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import LoadConfig, load_prompts, parse_loras, parse_size_mix, run_load  # noqa: E402
from benchmarks.loadgen.control import load_control_image  # noqa: E402
from benchmarks.served_app import (  # noqa: E402
    STAGES, Recorder, app_config, app_parser, deploy, ray_cpus, reset_stats, stage_stats, start_recording, wait_warm,
    without_gpu_shares,
)

LOADS = {"512": "512x512", "1024": "1024x1024", "mixed": "512x512:0.5,1024x1024:0.3,768x1344:0.2"}


def load(url: str, label: str, sizes: str, concurrency: int, steps: int, prompts: list[str], *,
         duration_s: float | None = None, requests: int | None = None, warmup: int = 0, **options) -> dict:
    """One loadgen run; `options` are `LoadConfig`'s (fresh prompts, adapters, control images)."""
    config = LoadConfig(
        url=url, concurrency=concurrency, duration_s=duration_s, requests=requests, warmup=warmup,
        size_mix=parse_size_mix(sizes), steps=steps, prompts=prompts, label=label, timeout_s=300,
        slo_ms=None, **options,
    )
    report = asyncio.run(run_load(config))
    print(report.format_table(), flush=True)
    data = report.to_dict()
    data.pop("records", None)
    return data


def lora_first(url: str, names: list[str], size: str, steps: int, prompt: str, scale: float) -> dict:
    """Per adapter: seconds of one request while no replica has seen it, then of the same request again."""
    out = {}
    for name in names:
        body = {"prompt": prompt, "size": size, "seed": 1, "num_inference_steps": steps,
                "loras": [{"name": name, "scale": scale}]}
        times = []
        for _ in range(2):
            start = time.perf_counter()
            httpx.post(f"{url}/v1/images/generations", json=body, timeout=600).raise_for_status()
            times.append(round(time.perf_counter() - start, 3))
        out[name] = {"unseen_s": times[0], "cached_s": times[1], "extra_s": round(times[0] - times[1], 3)}
    return out


def lora_names(args, app: dict) -> list[str]:
    """The adapters of the run: `--loras`, or `--lora-random` of them written into a fresh `lora_dir`."""
    if not args.lora_random:
        return parse_loras(args.loras)
    import tempfile

    from benchmarks.lora_files import transformer_shapes, write_random_adapters

    directory = Path(tempfile.mkdtemp(prefix="bench-serve-loras-"))
    app["args"]["lora_dir"] = str(directory)
    transformer = transformer_shapes(args.model, app["args"].get("cache_dir"))
    return write_random_adapters(transformer, directory, args.lora_random, args.lora_rank)


def batch_summary() -> dict:
    summary = {}
    for name in STAGES:
        methods = stage_stats(name)["methods"]
        summary[name] = {
            method: {"mean_batch": round(sum(s["batch_sizes"]) / max(1, len(s["batch_sizes"])), 2),
                     "max_batch": max(s["batch_sizes"] or [0]),
                     "mean_ms_per_batch": round(1000 * s["busy_s"] / max(1, s["batches"]), 2)}
            for method, s in methods.items()
        }
    return summary


def run_ours(args, recorder: Recorder, prompts: list[str]) -> None:
    import ray
    from ray import serve

    os.environ["ZIMAGE_METRICS"] = "1" if args.metrics == "on" else "0"  # local replicas inherit it
    ray.init(num_cpus=ray_cpus(args), include_dashboard=False, log_to_driver=args.verbose)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}"
    config = app_config(args) if args.device != "cpu" else without_gpu_shares(app_config(args))
    loras = lora_names(args, config["applications"][0])
    try:
        startup_s = deploy(config)
        memory = {name: {k: v for k, v in stage_stats(name).items() if k.startswith("gpu_") or k.endswith("seconds")}
                  for name in STAGES}
        recorder.put("startup", {"seconds": round(startup_s, 1), "stages": memory,
                                 "warm_after_ready_s": round(wait_warm(), 1)})
        print("startup", json.dumps(recorder.data["startup"], indent=1), flush=True)

        body = {"prompt": prompts[0], "size": "1024x1024", "seed": 1, "num_inference_steps": args.steps}
        start = time.perf_counter()
        first = httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)
        first_s = time.perf_counter() - start
        first.raise_for_status()
        reset_stats()
        single = load(url, "ours c1 1024", "1024x1024", 1, args.steps, prompts, requests=args.single_requests,
                      warmup=1)
        memory_after = {name: {k: v for k, v in stage_stats(name).items() if k.startswith("gpu_")}
                        for name in STAGES}
        recorder.put("single", {"first_request_s": round(first_s, 3), "first_timings": first.json()["timings"],
                                "warm": single, "stages": batch_summary(), "stage_memory_after": memory_after})
        if args.fresh_prompts:  # the same requests, each with a prompt (and often a length) never sent before
            recorder.put("single/fresh", load(url, "ours c1 1024 fresh", "1024x1024", 1, args.steps, prompts,
                                              requests=args.single_requests, fresh_prompts=True))

        if loras:
            size = LOADS[args.loads[0]] if args.loads and ":" not in LOADS[args.loads[0]] else "1024x1024"
            recorder.put("lora_first", lora_first(url, loras, size, args.steps, prompts[0], args.lora_scale))
            single_lora = load(url, "ours c1 1024 lora", "1024x1024", 1, args.steps, prompts,
                               requests=args.single_requests, warmup=1, loras=loras[:1], lora_scale=args.lora_scale)
            single_lora["p50_vs_no_adapters"] = round(
                single_lora["latency"]["p50_ms"] / max(single["latency"]["p50_ms"], 1e-9), 4)
            recorder.put("single/lora", single_lora)
        for policy in args.policies:
            deploy(config, {"scheduling": policy})
            for name in args.loads:
                reset_stats()
                result = load(url, f"ours {policy} c{args.concurrency} {name}", LOADS[name], args.concurrency,
                              args.steps, prompts, duration_s=args.duration, warmup=2)
                result["batches"] = batch_summary()
                recorder.put(f"load/{policy}/{name}", result)
                plain = result
                if args.fresh_prompts:
                    reset_stats()
                    plain = load(url, f"ours {policy} c{args.concurrency} {name} fresh", LOADS[name],
                                 args.concurrency, args.steps, prompts, duration_s=args.duration, warmup=2,
                                 fresh_prompts=True)
                    plain["batches"] = batch_summary()
                    recorder.put(f"load/{policy}/{name}/fresh", plain)
                if loras:  # the same load (fresh prompts too, if asked), each request with one of the adapters
                    reset_stats()
                    with_loras = load(url, f"ours {policy} c{args.concurrency} {name} loras", LOADS[name],
                                      args.concurrency, args.steps, prompts, duration_s=args.duration, warmup=2,
                                      fresh_prompts=args.fresh_prompts, loras=loras, lora_scale=args.lora_scale)
                    with_loras["batches"] = batch_summary()
                    with_loras["throughput_vs_no_adapters"] = round(
                        with_loras["images_per_s"] / max(plain["images_per_s"], 1e-9), 4)
                    recorder.put(f"load/{policy}/{name}/loras", with_loras)
                if args.control_fraction:  # the same load (fresh prompts or not), a share of it controlled
                    reset_stats()
                    controlled = load(url, f"ours {policy} c{args.concurrency} {name} control", LOADS[name],
                                      args.concurrency, args.steps, prompts, duration_s=args.duration, warmup=2,
                                      fresh_prompts=args.fresh_prompts, **control_options(args))
                    controlled["batches"] = batch_summary()
                    controlled["throughput_vs_plain"] = round(
                        controlled["images_per_s"] / max(plain["images_per_s"], 1e-9), 4)
                    recorder.put(f"load/{policy}/{name}/control", controlled)
        if loras:
            recorder.put("lora_targets", lora_targets(recorder.data))
        if args.control_fraction:
            recorder.put("control_targets", control_targets(recorder.data))
    finally:
        serve.shutdown()
        ray.shutdown()


LORA_TARGETS = {"served_throughput_ratio": (">=", 0.90), "single_p50_ratio": ("<=", 1.08),
                "unseen_extra_s": ("<=", 1.5)}
CONTROL_TARGETS = {"served_throughput_ratio": (">=", 0.75)}


def verdicts(title: str, figures: dict[str, float], targets: dict[str, tuple[str, float]]) -> dict:
    """Each figure against its target (`(op, value)`), printed on one line; a target without a figure
    is reported as not measured, never as met."""
    out = {}
    for name, (op, target) in targets.items():
        value = figures.get(name)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out[name] = {"value": value, "target": f"{op} {target}", "met": met}
    shown = {True: "met", False: "NOT met", None: "not measured"}
    print(f"{title}: " + "; ".join(f"{k} {v['value']} ({v['target']}: {shown[v['met']]})" for k, v in out.items()),
          flush=True)
    return out


def lora_targets(data: dict) -> dict:
    """The LoRA figures against their targets: each load's throughput with adapters over without, the
    1-client p50 with one adapter over without, the worst unseen adapter's extra seconds."""
    figures = {"single_p50_ratio": data["single/lora"]["p50_vs_no_adapters"],
               "unseen_extra_s": max(item["extra_s"] for item in data["lora_first"].values())}
    ratios = [v["throughput_vs_no_adapters"] for k, v in data.items() if k.endswith("/loras")]
    if ratios:
        figures["served_throughput_ratio"] = min(ratios)
    return verdicts("LoRA targets", figures, LORA_TARGETS)


def control_targets(data: dict) -> dict:
    """The served ControlNet figure against its target: the 1024x1024 loads' throughput with a share
    controlled over the same load without (the worst over the policies run)."""
    ratios = [v["throughput_vs_plain"] for k, v in data.items() if k.endswith("/1024/control")]
    return verdicts("ControlNet targets", {"served_throughput_ratio": min(ratios)} if ratios else {}, CONTROL_TARGETS)


def control_options(args) -> dict:
    """loadgen's control options from bench_serve's."""
    return {"control_fraction": args.control_fraction, "control_image": load_control_image(args.control_image),
            "control_preprocess": None if args.control_preprocess == "none" else args.control_preprocess}


def run_baseline(args, recorder: Recorder, prompts: list[str]) -> None:
    port = args.port + 100
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(Path(args.json).with_suffix(".baseline.log"), "w")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "baseline_server.py"), "--model", args.model, "--device",
         args.device, "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.perf_counter()
        while True:
            if process.poll() is not None:
                raise RuntimeError("baseline server exited; see its log")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - start > 600:
                raise TimeoutError("baseline server did not start")
            time.sleep(1)
        single = load(url, "baseline c1 1024", "1024x1024", 1, args.steps, prompts,
                      requests=max(3, args.single_requests // 2), warmup=1)
        recorder.put("baseline/single", single)
        for name in args.loads:
            if name == "mixed":
                continue
            result = load(url, f"baseline c{args.concurrency} {name}", LOADS[name], args.concurrency, args.steps,
                          prompts, duration_s=args.duration, warmup=0)
            recorder.put(f"baseline/load/{name}", result)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def summarize(data: dict) -> str:
    lines = ["", "summary (images/s, p50 ms)"]
    for key, value in data.items():
        if isinstance(value, dict) and "images_per_s" in value:
            lines.append(f"  {key:<32} {value['images_per_s']:>8.3f} img/s  p50 {value['latency']['p50_ms']:>9.1f}")
            if "throughput_vs_no_adapters" in value:
                lines.append(f"    {value['throughput_vs_no_adapters']:.3f}x the throughput without adapters")
            if "throughput_vs_plain" in value:
                lines.append(f"    {value['throughput_vs_plain']:.3f}x the throughput without control")
        if isinstance(value, dict) and "warm" in value:
            warm = value["warm"]
            lines.append(f"  {key + ' (warm)':<32} {warm['images_per_s']:>8.3f} img/s  p50 "
                         f"{warm['latency']['p50_ms']:>9.1f}  first {value['first_request_s']:.2f} s")
            if warm.get("server_timings_p50_ms"):
                parts = ", ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in warm["server_timings_p50_ms"].items())
                lines.append(f"    server p50 ms: {parts}; outside the server {warm.get('outside_server_p50_ms') or 0:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = app_parser(__doc__, "bench_serve.json")
    parser.add_argument("--one-gpu", action="store_true", help="cap GPU stages at one replica each")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--single-requests", type=int, default=10)
    parser.add_argument("--policies", default="continuous", help="comma separated: continuous,batch,single")
    parser.add_argument("--loads", default="512,1024,mixed")
    parser.add_argument("--fresh-prompts", action="store_true",
                        help="after each of our loads, the same load with a prompt never sent before per request")
    parser.add_argument("--loras", default="", help="adapters of the server's lora_dir, comma separated: each "
                        "load runs again with every request picking one")
    parser.add_argument("--lora-random", type=int, default=0, help="write N random adapters for the run instead")
    parser.add_argument("--lora-rank", type=int, default=32, help="their rank")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--control-fraction", type=float, default=0.0, help="each load again with this share of "
                        "requests carrying a control image (a ControlNet on the app)")
    parser.add_argument("--control-image", default=None, help="that image (default: loadgen's photo-like JPEG)")
    parser.add_argument("--control-preprocess", choices=("canny", "none"), default="canny")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--quick", action="store_true", help="short loads (smoke test)")
    parser.add_argument("--metrics", choices=("on", "off"), default="on",
                        help="the app's Prometheus metrics (ZIMAGE_METRICS in the replicas' environment)")
    args = parser.parse_args(argv)
    args.policies = [p for p in args.policies.split(",") if p]
    args.loads = [p for p in args.loads.split(",") if p]
    if not 0.0 <= args.control_fraction <= 1.0:
        parser.error("--control-fraction takes a share within 0..1")
    if args.quick:
        args.duration, args.single_requests, args.concurrency = 5.0, 3, min(args.concurrency, 4)
    recorder = start_recording(args)
    prompts = load_prompts(ROOT / "benchmarks" / "prompts.txt")
    if not args.skip_ours:
        run_ours(args, recorder, prompts)
    if not args.skip_baseline:
        run_baseline(args, recorder, prompts)
    print(summarize(recorder.data))


if __name__ == "__main__":
    main()
