"""The application under benchmark, as bench_serve, bench_scale, bench_cold_path and bench_tenants
deploy it: serve_config.yaml's app with the run's model, device and extra args, deployed on a local Ray
instance, its stages' stats, and the parser and JSON recorder every such benchmark starts from."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_info import commit  # noqa: E402

APP = "zimage"
STAGES = ("TextEncoder", "Denoiser", "VaeDecoder")


class Recorder:
    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str))


def app_config(args) -> dict:
    config = yaml.safe_load((ROOT / args.config).read_text())
    app = copy.deepcopy(config["applications"][0])
    app["args"].update(model=args.model, device=args.device)
    # The shipped bucket for compiled code is not reachable from a benchmark machine: the node caches for
    # itself under ZIMAGE_CACHE_DIR (`--set 'compile_cache={directory: ...}'` names a shared one).
    app["args"].pop("compile_cache", None)
    for item in args.set or []:
        key, _, value = item.partition("=")
        app["args"][key] = yaml.safe_load(value)
    if getattr(args, "control_fraction", 0) and not app["args"].get("controlnet"):
        if args.model not in ("random", "tiny"):
            raise SystemExit("--control-fraction needs a ControlNet: --set controlnet=<hub id, directory or file>")
        app["args"]["controlnet"] = args.model  # the random (or tiny) ControlNet beside the random (tiny) model
    if args.one_gpu:  # the autoscaler must not ask for replicas that a single GPU cannot place
        for deployment in app["deployments"]:
            if deployment["name"] in STAGES and "autoscaling_config" in deployment:
                deployment["autoscaling_config"] = {**deployment["autoscaling_config"], "max_replicas": 1}
    return {"http_options": {"host": "127.0.0.1", "port": args.port}, "applications": [app]}


def without_gpu_shares(config: dict) -> dict:
    """The config with no GPU asked for: the shipped file's GPU shares (the replicas' `num_gpus` and the
    policy's `replica_resources`) cannot be placed on a CPU-only machine. bench_scale and bench_cold_path
    keep them, as they place replicas on Ray's simulated GPUs."""
    config = copy.deepcopy(config)
    for deployment in config["applications"][0]["deployments"]:
        deployment.get("ray_actor_options", {}).pop("num_gpus", None)
        policy = deployment.get("autoscaling_config", {}).get("policy", {})
        policy.get("policy_kwargs", {}).get("replica_resources", {}).pop("GPU", None)
    return config


def deploy(config: dict, denoiser_user_config: dict | None = None, timeout_s: float = 900) -> float:
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(config)
    if denoiser_user_config is not None:
        for item in config["applications"][0]["deployments"]:
            if item["name"] == "Denoiser":
                item["user_config"] = {**item.get("user_config", {}), **denoiser_user_config}
    start = time.perf_counter()
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    wanted = (denoiser_user_config or {}).get("scheduling")
    while time.perf_counter() - start < timeout_s:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(status.message)
        if status is not None and status.status == "RUNNING":
            if wanted is None or stage_stats("Denoiser").get("scheduling") == wanted:
                return time.perf_counter() - start
        time.sleep(0.5)
    raise TimeoutError("the application did not become ready")


def wait_warm(timeout_s: float = 600) -> float:
    """Seconds until every stage's warm-up after ready is done (batched graphs, the Denoiser's caption
    buckets and presets, the VAE's dynamic graph), so that no load runs beside it."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        stats = [stage_stats(name) for name in STAGES]
        if all((s.get(key) or {"ready": True}).get("ready", True) for s in stats
               for key in ("warm_after_ready", "shape_warmup")):
            break
        time.sleep(1)
    return time.perf_counter() - start


def stage_stats(name: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(name, APP).stats.remote().result(timeout_s=60)


def reset_stats() -> None:
    from ray import serve

    for name in STAGES:
        serve.get_deployment_handle(name, APP).reset_stats.remote().result(timeout_s=60)


def ray_cpus(args) -> int | None:
    """Ray's logical CPUs: `--cpus`, else detected; on a CPU run at least 8, since the shipped config
    reserves 5.1 logical CPUs across its stages and a small machine would leave replicas unplaced."""
    if args.cpus is None and args.device == "cpu":
        return max(8, os.cpu_count() or 1)
    return args.cpus


@contextlib.contextmanager
def local_serve(args, num_gpus: int | None = None) -> Iterator[str]:
    """A fresh Ray instance (`num_gpus`: detected when None) with Serve on 127.0.0.1; yields its URL."""
    import ray
    from ray import serve

    ray.init(num_cpus=ray_cpus(args), num_gpus=num_gpus, include_dashboard=False, log_to_driver=args.verbose)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    try:
        yield f"http://127.0.0.1:{args.port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def add_app_options(parser: argparse.ArgumentParser) -> None:
    """The options `app_config` reads: which config file, model, device, extra args and port."""
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--model", default="random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--set", action="append", help="extra app arg, key=value (YAML value)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cpus", type=int, default=None, help="Ray's logical CPUs (the file reserves some per stage)")


def app_parser(doc: str | None, json_default: str) -> argparse.ArgumentParser:
    """A benchmark's parser with what every benchmark of the deployed app takes: `add_app_options`,
    the steps per image, replica logs and the JSON file it writes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_app_options(parser)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--verbose", action="store_true", help="show replica logs")
    parser.add_argument("--json", default=json_default)
    return parser


def start_recording(args: argparse.Namespace, **meta) -> Recorder:
    """The run's JSON file (`--json`), begun with its arguments and the commit and date it ran at."""
    recorder = Recorder(Path(args.json))
    recorder.put("args", vars(args))
    recorder.put("meta", {"commit": commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **meta})
    return recorder
