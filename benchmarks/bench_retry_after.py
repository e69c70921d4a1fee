"""What `Retry-After` buys the official client: twice as many clients as the server admits, each
sending requests one after another through OpenAI's Python client with its default retries (2, with
its own backoff when a 503 says nothing, or the server's `retry-after-ms` / `Retry-After`).

    python benchmarks/bench_retry_after.py --json /tmp/retry_after.json                 # tiny on a CPU
    python benchmarks/bench_retry_after.py --model random --device cuda --size 1024x1024 --steps 8 \\
        --admit 16 --json retry_after.json                                               # one H200

Two runs on one server, in one process: `honoured` (the client waits as told), then `ignored` (a
client-side hook drops the two headers, as before the server sent them: the client backs off 0.5 s
then 1 s). Reported per run: requests, the share that finally succeeded, HTTP attempts, retries, the
wasted retries (retries answered 503 again), images/s, the successes' p50 latency (waits included)
and the p50 of the waits the server told.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.burst import percentile  # noqa: E402
from benchmarks.run_info import commit  # noqa: E402

APP = "zimage"
RETRY_HEADERS = ("retry-after", "retry-after-ms")
attempts_of_request: contextvars.ContextVar[list[int]] = contextvars.ContextVar("attempts")


def app_config(args) -> dict:
    knobs = {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}
    app_args = {"model": args.model, "device": args.device, "api": {"max_inflight_requests": args.admit},
                "text_encoder": {"user_config": knobs}, "vae": {"user_config": knobs},
                "denoiser": {"user_config": knobs}}
    return {"http_options": {"host": "127.0.0.1", "port": args.port},
            "applications": [{"name": APP, "route_prefix": "/", "import_path": "serve_app:build_app",
                              "args": app_args}]}


def start_app(args) -> str:
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(app_config(args)))
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(status.message)
        if status is not None and status.status == "RUNNING":
            return f"http://127.0.0.1:{args.port}"
        time.sleep(0.5)
    raise TimeoutError("the application did not start")


async def run(url: str, args, honour: bool) -> dict:
    """`2 x admit` closed-loop clients (args.clients), `args.requests` requests each, default retries."""
    import openai

    told: list[float] = []

    async def on_response(response) -> None:
        attempts_of_request.get().append(response.status_code)
        if response.status_code == 503 and "retry-after-ms" in response.headers:
            told.append(int(response.headers["retry-after-ms"]) / 1000)
        if not honour:
            for name in RETRY_HEADERS:
                response.headers.pop(name, None)

    http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [on_response]})
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", http_client=http, timeout=600)
    outcomes: list[dict] = []

    async def one_client(index: int) -> None:
        for number in range(args.requests):
            statuses: list[int] = []
            attempts_of_request.set(statuses)
            start = time.perf_counter()
            try:
                await client.images.generate(prompt=f"a lighthouse at dusk, study {index}-{number}", size=args.size,
                                             extra_body={"num_inference_steps": args.steps,
                                                         "seed": 1000 * index + number})
                ok = True
            except openai.APIStatusError:
                ok = False
            outcomes.append({"ok": ok, "seconds": time.perf_counter() - start, "statuses": statuses})

    start = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(args.clients)))
    wall = time.perf_counter() - start
    await client.close()
    attempts = sum(len(o["statuses"]) for o in outcomes)
    retries = sum(len(o["statuses"]) - 1 for o in outcomes)
    wasted = sum(s == 503 for o in outcomes for s in o["statuses"][1:])
    succeeded = sum(o["ok"] for o in outcomes)
    return {
        "retry_after": "honoured" if honour else "ignored", "requests": len(outcomes), "succeeded": succeeded,
        "success_share": round(succeeded / len(outcomes), 3), "attempts": attempts, "retries": retries,
        "wasted_retries": wasted, "refusals": sum(s == 503 for o in outcomes for s in o["statuses"]),
        "other_errors": sum(s not in (200, 503) for o in outcomes for s in o["statuses"]),
        "images_per_s": round(succeeded / wall, 3), "wall_s": round(wall, 1),
        "success_p50_s": round(percentile([o["seconds"] for o in outcomes if o["ok"]], 50), 2),
        "told_p50_s": round(percentile(told, 50), 2) if told else None, "told_max_s": max(told, default=None),
    }


def table(rows: list[dict]) -> str:
    cols = ["retry_after", "requests", "succeeded", "success_share", "attempts", "retries", "wasted_retries",
            "images_per_s", "success_p50_s", "told_p50_s"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(str(row[c]) for c in cols) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an app already running (started with api.max_inflight_requests = --admit)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-cpus", type=int, default=8)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--admit", type=int, default=4, help="api.max_inflight_requests")
    parser.add_argument("--clients", type=int, help="default: 2 x --admit")
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.clients = args.clients or 2 * args.admit
    url = args.url or start_app(args)
    asyncio.run(run(url, argparse.Namespace(**{**vars(args), "clients": args.admit, "requests": 1}), True))  # warm
    # Honoured first: each refusal counts as a client told to come back, so refusals of clients that
    # ignore the headers would lengthen the waits the next run is told; the ignored run reads none.
    rows = [asyncio.run(run(url, args, honour)) for honour in (True, False)]
    print(table(rows))
    if args.json:
        report = {"benchmark": "bench_retry_after", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "commit": commit(), "model": args.model, "device": args.device, "admit": args.admit,
                  "clients": args.clients, "requests_per_client": args.requests, "size": args.size,
                  "steps": args.steps, "runs": rows}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
