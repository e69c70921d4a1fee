"""The ramp: a closed-loop load stepped from 0 to C clients on a node with N GPUs (serve_config.yaml as
shipped, model=random), with throughput per window, replicas per deployment over time and the time
until throughput first reaches 90% of its steady state. Several GPU counts run one after another in
one process (`--gpus 1,2`: Ray started with num_gpus=1, then 2), so their ratio comes from one session.

    python benchmarks/bench_scale.py --gpus 1,2 --clients 32 --duration 300 --json scale.json     # H200s
    python benchmarks/bench_scale.py --model tiny --device cpu --cpus 16 --gpus 1 --clients 4 --duration 40 \
        --size 512x512 --steps 2                                                                # CPU smoke

Steady state: the mean throughput over the last third of the run. A replica count is Serve's RUNNING
replicas (serve.status()), sampled every `--sample-s`.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import LoadConfig, load_prompts, parse_size_mix, run_load  # noqa: E402
from benchmarks.served_app import APP, Recorder, app_config, app_parser, deploy, local_serve, start_recording  # noqa: E402

DEPLOYMENTS = ("Ingress", "PromptStyler", "TextEncoder", "Denoiser", "VaeDecoder")


class ReplicaSampler(threading.Thread):
    """RUNNING replicas (and all others) per deployment, every `period_s`, until stopped."""

    def __init__(self, period_s: float):
        super().__init__(daemon=True)
        self.period_s = period_s
        self.samples: list[dict] = []
        self.started = time.perf_counter()
        self._stop_event = threading.Event()

    def run(self) -> None:
        from ray import serve

        while not self._stop_event.is_set():
            app = serve.status().applications.get(APP)
            if app is not None:
                sample = {"t_s": round(time.perf_counter() - self.started, 1)}
                for name in DEPLOYMENTS:
                    states = app.deployments[name].replica_states if name in app.deployments else {}
                    sample[name] = {str(getattr(k, "value", k)): v for k, v in states.items()}
                self.samples.append(sample)
            self._stop_event.wait(self.period_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


def windows(records, window_s: float, duration_s: float) -> list[dict]:
    """Images finished per window (by completion time), as images/s."""
    counts = [0] * max(1, int(duration_s // window_s + 1))
    for r in records:
        if r.ok:
            end = r.start_s + r.latency_ms / 1000
            index = int(end // window_s)
            if index < len(counts):
                counts[index] += r.images
    return [{"t_end_s": (i + 1) * window_s, "images_per_s": round(c / window_s, 3)} for i, c in enumerate(counts)]


def time_to_90(series: list[dict]) -> tuple[float, float | None]:
    """(steady images/s: mean of the last third of full windows, end of the first window at >= 90% of it)."""
    full = series[:-1] or series  # the last window is cut short by the end of the run
    tail = full[len(full) * 2 // 3:] or full
    steady = sum(w["images_per_s"] for w in tail) / len(tail)
    reached = next((w["t_end_s"] for w in full if steady > 0 and w["images_per_s"] >= 0.9 * steady), None)
    return steady, reached


def one_run(args, gpus: int, recorder: Recorder, prompts: list[str]) -> float:
    with local_serve(args, gpus) as url:
        ready_s = deploy(app_config(args))
        print(f"\n{gpus} GPU(s): ready in {ready_s:.1f} s; {args.clients} clients from t=0 for {args.duration:.0f} s",
              flush=True)
        sampler = ReplicaSampler(args.sample_s)
        sampler.start()
        config = LoadConfig(url=url, concurrency=args.clients, duration_s=args.duration,
                            size_mix=parse_size_mix(args.size), steps=args.steps, prompts=prompts,
                            label=f"scale {gpus} gpu", timeout_s=600)
        report = asyncio.run(run_load(config))
        sampler.stop()
        series = windows(report.records, args.window, args.duration)
        steady, reached = time_to_90(series)
        print(f"{'t (s)':>6} {'img/s':>7}  replicas (RUNNING) " + " ".join(f"{d[:8]:>8}" for d in DEPLOYMENTS)
              + "  Denoiser in any state (asked for)")
        for w in series:
            sample = next((s for s in reversed(sampler.samples) if s["t_s"] <= w["t_end_s"]), None) or {}
            counts = " ".join(f"{sample.get(d, {}).get('RUNNING', 0):>8}" for d in DEPLOYMENTS)
            asked = sum(sample.get("Denoiser", {}).values())
            print(f"{w['t_end_s']:>6.0f} {w['images_per_s']:>7.3f}  {'':18} {counts}  {asked:>8}")
        reached_text = f"{reached:.0f} s" if reached is not None else "never"
        print(f"steady {steady:.3f} img/s; 90% of it reached after {reached_text}")
        data = report.to_dict()
        data.pop("records", None)
        recorder.put(f"gpus/{gpus}", {"ready_s": round(ready_s, 1), "windows": series, "replicas": sampler.samples,
                                      "steady_images_per_s": round(steady, 3), "time_to_90_s": reached,
                                      "load": data})
        return steady


def main(argv: list[str] | None = None) -> None:
    parser = app_parser(__doc__, "scale.json")
    parser.add_argument("--gpus", default="1,2", help="GPU counts to run, one after another")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--size", default="1024x1024", help="size mix, as loadgen's --size-mix")
    args = parser.parse_args(argv)
    args.one_gpu = False  # app_config's option: the shipped autoscaling stays as it is
    recorder = start_recording(args)
    prompts = load_prompts(ROOT / "benchmarks" / "prompts.txt")
    steady = {int(g): one_run(args, int(g), recorder, prompts) for g in args.gpus.split(",") if g}
    base = next(iter(steady.values()))
    print("\nsteady img/s: " + ", ".join(f"{g} GPU {s:.3f} ({s / base:.2f}x)" for g, s in steady.items() if base))
    recorder.put("steady_ratio", {g: round(s / base, 3) if base else None for g, s in steady.items()})


if __name__ == "__main__":
    main()
