"""Chaos benchmark: kill a stage's replica under closed-loop load and measure what clients see.

    python benchmarks/bench_chaos.py --json chaos.json                                  # one H200, model=random
    python benchmarks/bench_chaos.py --model tiny --device cpu --num-cpus 8 --size 512x512 --steps 2 \\
        --clients 4 --warmup 15 --after 45 --json /tmp/chaos.json                      # CPU smoke run

The app starts from serve_config.yaml (model and device replaced, the killed stage held at one
replica so that its death is a real outage), `--clients` clients each send seeded requests one after
another, and after `--warmup` seconds the stage's replica actor is killed (`ray.kill`). Reported:
lost requests (any non-200; target 0), the stall (the longest gap between two completions, and the
longest one that ends after the kill), the time until Serve has the replacement RUNNING, and the time until the
first request sent after the kill completes.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_info import commit  # noqa: E402

APP = "zimage"
GPU_STAGES = ("TextEncoder", "Denoiser", "VaeDecoder")


@dataclass
class Outcome:
    client: int
    seed: int
    sent: float  # seconds since the load began
    done: float
    status: int  # 0: no HTTP answer
    error: str = ""


def serve_config(args) -> dict:
    """serve_config.yaml with the model and device replaced, the GPU stages and the killed one at one replica."""
    config = yaml.safe_load((ROOT / args.config).read_text())
    app = copy.deepcopy(config["applications"][0])
    app["args"].update(model=args.model, device=args.device)
    app["args"].pop("compile_cache", None)  # no bucket here: the replacement starts from the node's own cache
    for deployment in app["deployments"]:
        if args.device != "cuda":  # the file's GPU shares would leave the replicas pending on a CPU
            deployment.get("ray_actor_options", {}).pop("num_gpus", None)
        if deployment["name"] in GPU_STAGES or deployment["name"] == args.kill:
            deployment.pop("autoscaling_config", None)
            deployment["num_replicas"] = 1
    return {"http_options": {"host": "127.0.0.1", "port": args.port}, "applications": [app]}


def start_app(args) -> float:
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=args.verbose)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    start = time.perf_counter()
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(serve_config(args)))
    while time.perf_counter() - start < args.startup_timeout:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(status.message)
        if status is not None and status.status == "RUNNING":
            return time.perf_counter() - start
        time.sleep(0.5)
    raise TimeoutError("the application did not start")


def replica_names(stage: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{stage}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def kill(stage: str) -> str:
    """Kills the stage's (first) replica actor, as a crash would; returns its name."""
    import ray

    name = replica_names(stage)[0]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def running_replicas(stage: str) -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    status = app.deployments.get(stage) if app is not None else None
    return status.replica_states.get("RUNNING", 0) if status is not None else 0


async def drive(args, url: str) -> tuple[list[Outcome], float, float | None]:
    """The load, the kill at `warmup` seconds, and when the replacement was RUNNING (seconds after the kill)."""
    outcomes: list[Outcome] = []
    began = time.perf_counter()
    stop_at = args.warmup + args.after
    body = {"prompt": "a lighthouse on a cliff at dusk, oil painting", "size": args.size,
            "num_inference_steps": args.steps}

    async def client(index: int, http: httpx.AsyncClient) -> None:
        n = 0
        while time.perf_counter() - began < stop_at:
            seed = index * 1_000_000 + n
            n += 1
            sent = time.perf_counter() - began
            try:
                response = await http.post("/v1/images/generations", json={**body, "seed": seed})
                status, error = response.status_code, "" if response.status_code == 200 else response.text[:300]
            except httpx.HTTPError as exc:
                status, error = 0, f"{type(exc).__name__}: {exc}"
            outcomes.append(Outcome(index, seed, sent, time.perf_counter() - began, status, error))

    async def chaos() -> tuple[float, float | None]:
        await asyncio.sleep(args.warmup)
        killed_at = time.perf_counter() - began
        name = await asyncio.to_thread(kill, args.kill)
        print(f"killed {name} at {killed_at:.1f}s", flush=True)
        while time.perf_counter() - began < stop_at:
            await asyncio.sleep(0.25)
            names = await asyncio.to_thread(replica_names, args.kill)
            # a new replica exists and one is RUNNING: the dead one has left the counts by then
            if any(n != name for n in names) and await asyncio.to_thread(running_replicas, args.kill) > 0:
                return killed_at, time.perf_counter() - began - killed_at
        return killed_at, None

    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as http:
        results = await asyncio.gather(chaos(), *(client(i, http) for i in range(args.clients)))
    killed_at, replaced_after = results[0]
    return outcomes, killed_at, replaced_after


def summarize(outcomes: list[Outcome], killed_at: float, replaced_after: float | None) -> dict:
    done = sorted(o.done for o in outcomes if o.status == 200)
    gaps = [(b - a, a) for a, b in zip(done, done[1:])]
    longest, longest_from = max(gaps, default=(0.0, 0.0))
    after_kill = max((g for g, start in gaps if start + g >= killed_at), default=0.0)
    sent_after = [o.done - killed_at for o in outcomes if o.sent > killed_at and o.status == 200]
    before = [o.done - o.sent for o in outcomes if o.done < killed_at and o.status == 200]
    return {
        "requests": len(outcomes),
        "ok": len(done),
        "lost": sum(o.status != 200 for o in outcomes),
        "lost_detail": [asdict(o) for o in outcomes if o.status != 200][:20],
        "killed_at_s": round(killed_at, 2),
        "longest_gap_s": round(longest, 2),
        "longest_gap_began_s": round(longest_from, 2),
        "longest_gap_after_kill_s": round(after_kill, 2),
        "replacement_running_after_s": round(replaced_after, 2) if replaced_after is not None else None,
        "first_request_sent_after_kill_done_after_s": round(min(sent_after), 2) if sent_after else None,
        "latency_before_kill_p50_s": round(sorted(before)[len(before) // 2], 3) if before else None,
    }


def table(summary: dict) -> str:
    rows = [(key, summary[key]) for key in summary if key != "lost_detail"]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--model", default="random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--kill", default="Denoiser", choices=["PromptStyler", *GPU_STAGES])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of load before the kill")
    parser.add_argument("--after", type=float, default=120.0, help="seconds of load after the kill")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--startup-timeout", type=float, default=1200.0)
    parser.add_argument("--num-cpus", type=int, help="Ray's CPU count (serve_config.yaml asks for 5 CPUs)")
    parser.add_argument("--verbose", action="store_true", help="show replica logs")
    parser.add_argument("--json", default="bench_chaos.json")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    try:
        startup_s = start_app(args)
        outcomes, killed_at, replaced_after = asyncio.run(drive(args, f"http://127.0.0.1:{args.port}"))
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = summarize(outcomes, killed_at, replaced_after)
    record = {"meta": {"commit": commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
              "args": vars(args), "startup_s": round(startup_s, 1), "summary": summary,
              "outcomes": [asdict(o) for o in outcomes]}
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"chaos: kill {args.kill} after {args.warmup:.0f}s, {args.clients} clients at {args.size}, "
          f"{args.steps} steps")
    print(table(summary))


if __name__ == "__main__":
    main()
