"""Fairness between keys: key A keeps 100 requests in flight, key B sends one request at a time.

    python benchmarks/bench_tenants.py --json tenants.json                   # one GPU: random, 1024x1024
    python benchmarks/bench_tenants.py --model tiny --device cpu --size 512x512 --steps 2 \\
        --duration 60 --b-requests 8 --json tenants_cpu.json                  # smoke run on a CPU

The app is serve_config.yaml's (GPU stages capped at one replica each, as bench_serve's --one-gpu),
with two named keys, A and B, of weight 1 and no limits. Phases, one server, one process:

  idle     B alone, one request at a time: its latency on an idle server
  alone    A alone, `--a-in-flight` requests always in flight: its throughput (images/s)
  shared   A as in `alone` and B one request at a time beside it, for `--duration`: B's latency,
           A's throughput over the same time. A request of B still open at the end counts with the
           time it has waited so far; when that could move the p50, the p50 is printed as a lower
           bound (`>=`).

Targets (issue 33): B's p50 in `shared` at most 1.5x its p50 in `idle`; A's throughput in `shared`
at least 0.9x its throughput in `alone`. `--windows 8,16,...` runs `alone` and `shared` again for
each `api.release_window` (images per Denoiser replica, set as live config; `none` for no holding
back in the Ingress): how small a window keeps the GPU busy, and what it costs B.
`--denoiser-batch N` sets the Denoiser's `max_batch_size` (the step batch B's job shares with A's). `--keys off` deploys no keys at all, for code from before
named keys: the figure of the server without per-key fairness.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.served_app import (  # noqa: E402
    APP, app_config, app_parser, deploy, local_serve, stage_stats, start_recording, without_gpu_shares,
)
from benchmarks.burst import percentile  # noqa: E402

GENERATIONS = "/v1/images/generations"
KEYS = {"A": "sk-bench-tenant-a", "B": "sk-bench-tenant-b"}
B_SLOWDOWN_TARGET = 1.5
A_THROUGHPUT_TARGET = 0.9


@dataclass
class Done:
    key: str
    status: int
    started: float
    ended: float

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Phase:
    """Every request a phase sent, and the window (monotonic times) its figures are read in."""

    done: list[Done] = field(default_factory=list)
    open: dict[int, tuple[str, float]] = field(default_factory=dict)  # requests sent, not yet answered
    measured_from: float = 0.0
    measured_to: float = 0.0
    censored: int = 0  # B's requests still open when the phase ended, counted at their wait so far

    def latencies(self, key: str) -> list[float]:
        return sorted(d.seconds for d in self.done if d.key == key and d.status in (200, -1)
                      and d.started >= self.measured_from)

    def close_open(self, key: str) -> None:
        """`key`'s open requests, counted with the time they have waited (a lower bound)."""
        for started_key, started in self.open.values():
            if started_key == key and started >= self.measured_from:
                self.done.append(Done(key, -1, started, self.measured_to))
                self.censored += 1

    def ended(self, key: str) -> list[Done]:
        """`key`'s images answered within the measured window (for A: requests sent before it too)."""
        return [d for d in self.done if d.key == key and d.status == 200
                and self.measured_from <= d.ended <= self.measured_to]

    def images_per_s(self, key: str, n: int) -> float:
        return n * len(self.ended(key)) / max(1e-9, self.measured_to - self.measured_from)

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self.done:
            counts[f"{d.key} {d.status}"] = counts.get(f"{d.key} {d.status}", 0) + 1
        return counts


def body(args, seed: int) -> dict:
    return {"prompt": "a lighthouse on a cliff at dusk, oil painting", "size": args.size, "seed": seed,
            "num_inference_steps": args.steps, "n": args.n}


async def client_loop(client: httpx.AsyncClient, args, key: str, phase: Phase, stop: asyncio.Event,
                      seeds: list[int], requests: int | None = None) -> None:
    """One closed-loop client of `key`: a request, then the next as soon as it is answered."""
    headers = {"Authorization": f"Bearer {KEYS[key]}"}
    sent = 0
    while not stop.is_set() and (requests is None or sent < requests):
        seeds[0] += 1
        seed = seeds[0]  # the clients share the counter: this request's own
        started = time.monotonic()
        phase.open[seed] = (key, started)
        try:
            response = await client.post(GENERATIONS, json=body(args, seed), headers=headers)
            status = response.status_code
        except httpx.HTTPError:
            status = 0
        finally:
            phase.open.pop(seed, None)
        phase.done.append(Done(key, status, started, time.monotonic()))
        sent += 1


async def run_phase(url: str, args, a_clients: int, b_requests: int | None, duration_s: float) -> Phase:
    """A's `a_clients` closed-loop clients after a warm-up (none: no A), and B's single client
    (`b_requests` requests, None: as many as fit; 0: no B); measured for `duration_s`, or with no A
    until B is done."""
    phase = Phase()
    stop = asyncio.Event()
    seeds = [int(time.time())]
    limits = httpx.Limits(max_connections=a_clients + 8, max_keepalive_connections=a_clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        tasks = [asyncio.create_task(client_loop(client, args, "A", phase, stop, seeds)) for _ in range(a_clients)]
        if a_clients:
            await asyncio.sleep(args.warmup)  # A's queue fills and its first requests finish
        phase.measured_from = time.monotonic()
        b_task = None
        if b_requests != 0:
            b_task = asyncio.create_task(client_loop(client, args, "B", phase, stop, seeds, b_requests))
        if a_clients:
            await asyncio.sleep(duration_s)
        elif b_task is not None:
            await b_task
        phase.measured_to = time.monotonic()
        phase.close_open("B")
        stop.set()
        for task in tasks:
            task.cancel()  # A's open requests are dropped: the server cancels their work
        if b_task is not None:
            b_task.cancel()
        await asyncio.gather(*tasks, *(b_task,) if b_task else (), return_exceptions=True)
    return phase


def drained(timeout_s: float = 300, quiet_s: float = 3.0) -> None:
    """Until the Denoiser holds no image and the VaeDecoder has decoded nothing for `quiet_s`: the
    cancelled requests of a phase must not slow the next."""
    deadline = time.monotonic() + timeout_s
    decoded, since = None, time.monotonic()
    while time.monotonic() < deadline:
        work = stage_stats("Denoiser")["pending_work"]
        now_decoded = sum(m["items"] for m in stage_stats("VaeDecoder")["methods"].values())
        if now_decoded != decoded:
            decoded, since = now_decoded, time.monotonic()
        if work["queued_images"] == 0 and work["running_images"] == 0 and time.monotonic() - since >= quiet_s:
            return
        time.sleep(1.0)
    raise TimeoutError("the server did not drain")


def summary(phase: Phase, args, label: str) -> dict:
    b = phase.latencies("B")
    open_waits = sorted(d.seconds for d in phase.done if d.key == "B" and d.status == -1)
    return {"label": label, "b_requests": len(b), "b_open_at_end": phase.censored,
            "b_p50_s": round(percentile(b, 50), 3), "b_p90_s": round(percentile(b, 90), 3),
            "b_p50_is_lower_bound": bool(open_waits) and open_waits[0] <= percentile(b, 50),
            "b_latencies_s": [round(x, 3) for x in sorted(b)],
            "a_images_per_s": round(phase.images_per_s("A", args.n), 3),
            "a_p50_s": round(percentile([d.seconds for d in phase.ended("A")], 50), 3),
            "measured_s": round(phase.measured_to - phase.measured_from, 1), "statuses": phase.statuses(),
            "load_average_1m": round(os.getloadavg()[0], 1)}


def measure(url: str, args, label: str) -> dict:
    """`alone` and `shared` under the current config, each after the server has drained."""
    drained()
    alone = summary(asyncio.run(run_phase(url, args, args.a_in_flight, 0, args.duration)), args, f"{label} alone")
    print(json.dumps(alone), flush=True)
    drained()
    shared = summary(asyncio.run(run_phase(url, args, args.a_in_flight, None, args.duration)), args,
                     f"{label} shared")
    print(json.dumps(shared), flush=True)
    return {"alone": alone, "shared": shared}


def judged(idle: dict, run: dict) -> dict:
    b_ratio = run["shared"]["b_p50_s"] / idle["b_p50_s"]
    a_ratio = run["shared"]["a_images_per_s"] / max(1e-9, run["alone"]["a_images_per_s"])
    return {"b_ratio": round(b_ratio, 3), "b_met": b_ratio <= B_SLOWDOWN_TARGET,
            "a_ratio": round(a_ratio, 3), "a_met": a_ratio >= A_THROUGHPUT_TARGET}


def with_denoiser_batch(config: dict, batch: int | None) -> dict:
    if batch is not None:
        denoiser = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Denoiser")
        denoiser["user_config"] = {**denoiser.get("user_config", {}), "max_batch_size": batch}
    return config


def with_keys(config: dict, keys: str) -> dict:
    if keys == "named":
        args = config["applications"][0]["args"]
        args["api_keys"] = [{"name": name, "digest": "sha256:" + hashlib.sha256(key.encode()).hexdigest()}
                            for name, key in KEYS.items()]
    return config


def set_window(config: dict, window: int | None) -> None:
    """The Ingress's live `api.release_window`, applied in place (no replica restarts)."""
    config = json.loads(json.dumps(config))
    deployments = config["applications"][0]["deployments"]
    ingress = next(d for d in deployments if d["name"] == "Ingress")
    ingress["user_config"] = {"api": {"release_window": window}}
    deploy(config)


def table(data: dict) -> str:
    lines = ["| run | B p50 idle (s) | B p50 shared (s) | B ratio | A alone (img/s) | A shared (img/s) | A ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    idle = data["idle"]
    for name, run in data["runs"].items():
        verdict = run["verdict"]
        at_least = ">= " if run["shared"]["b_p50_is_lower_bound"] else ""
        lines.append(f"| {name} | {idle['b_p50_s']:.3f} | {at_least}{run['shared']['b_p50_s']:.3f} "
                     f"| {at_least}{verdict['b_ratio']:.2f}x "
                     f"| {run['alone']['a_images_per_s']:.3f} | {run['shared']['a_images_per_s']:.3f} "
                     f"| {verdict['a_ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = app_parser(__doc__, "bench_tenants.json")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--a-in-flight", type=int, default=100)
    parser.add_argument("--b-requests", type=int, default=20, help="B's requests on the idle server")
    parser.add_argument("--duration", type=float, default=120.0,
                        help="seconds measured in `alone`, and at most in `shared`")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of A's load before measuring")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--keys", choices=("named", "off"), default="named")
    parser.add_argument("--windows", default="", help="api.release_window values to measure, comma separated "
                        "(`none`: every admitted request sent on at once, only the Denoiser's queue ordered)")
    parser.add_argument("--denoiser-batch", type=int, default=None, help="the Denoiser's max_batch_size")
    args = parser.parse_args(argv)
    args.one_gpu = True
    recorder = start_recording(args, load_average=os.getloadavg())
    config = app_config(args)
    config = with_keys(config if args.device != "cpu" else without_gpu_shares(config), args.keys)
    config = with_denoiser_batch(config, args.denoiser_batch)
    with local_serve(args) as url:
        deploy(config)
        warm = asyncio.run(run_phase(url, args, 0, 2, 0))  # the first requests of a fresh server
        idle = summary(asyncio.run(run_phase(url, args, 0, args.b_requests, 0)), args, "idle")
        print(json.dumps(idle), flush=True)
        recorder.put("warm", warm.statuses())
        recorder.put("idle", idle)
        runs: dict[str, dict] = {}
        runs["default"] = measure(url, args, "default")
        runs["default"]["verdict"] = judged(idle, runs["default"])
        recorder.put("runs", runs)
        for window in [None if w == "none" else int(w) for w in args.windows.split(",") if w]:
            set_window(config, window)
            name = f"window {window}"
            runs[name] = measure(url, args, name)
            runs[name]["verdict"] = judged(idle, runs[name])
            recorder.put("runs", runs)
        recorder.put("app", APP)
    print(table(recorder.data))


if __name__ == "__main__":
    main()
