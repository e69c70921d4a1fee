"""`zimage-serve-cache`: build the stages' compile cache ahead of a rollout, on one GPU of the kind
the cluster runs, so that every replica of the rollout starts from it instead of compiling.

    zimage-serve-cache build --config serve_config.yaml     # each model stage started once, warm-ups included
    zimage-serve-cache list --config serve_config.yaml      # the files on this node and in the shared store

`build` starts each model stage of the config's application (TextEncoder, Denoiser, VaeDecoder) as a
replica would, with the application's args and each stage's live config (the file's `user_config`
over the args'), each in a process of its own (torch's caches are process-wide), one after another
(each needs the GPU). Each loads no cache file, compiles (inductor's and Triton's on-disk caches under
the node's `cache_dir` still serve what they hold), runs every warm-up, before and after ready, and
writes its file to the node's cache directory and to the args' `compile_cache` store (a shared
directory or a bucket). A file is named by what made it (model, the stage's choices, library
versions, GPU kind: `deployments/runtime/cache_key.py`), so build where those match the cluster's.

Exit status: 0 when every stage that compiles wrote its file to the node and the shared store; 1 when
a stage failed or a store could not be written; 2 when nothing was compiled (no GPU here, or compile
off): there is nothing to cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# The model stages: (Serve deployment name, the builder's stage key, the module of its deployment).
STAGES = {
    "TextEncoder": ("text_encoder", "deployments.text_encoder.deployment"),
    "Denoiser": ("denoiser", "deployments.denoiser.deployment"),
    "VaeDecoder": ("vae", "deployments.vae.deployment"),
}


def application(config_path: str, name: str | None) -> dict:
    """The config file's application named `name`, or its only (or first) one."""
    config = yaml.safe_load(Path(config_path).read_text())
    apps = config.get("applications") or []
    chosen = [app for app in apps if name is None or app.get("name") == name]
    if not chosen:
        raise SystemExit(f"{config_path}: no application {name!r} (it has {[a.get('name') for a in apps]})")
    return chosen[0]


def stage_inputs(app: dict) -> dict[str, dict]:
    """Each model stage's constructor arguments, as the builder and Serve give them: the model
    settings, and the live config made from the args with the file's `user_config` laid over it."""
    from deployments.runtime.stage import deep_merge
    from serve_app.builder import stage_options
    from serve_app.config import AppArgs

    args = AppArgs.from_args(app.get("args") or {})
    settings = args.model_settings().model_dump(mode="json")
    overrides = {d["name"]: d.get("user_config") or {} for d in app.get("deployments") or []}
    inputs = {}
    for name, (key, module) in STAGES.items():
        deployment = getattr(__import__(module, fromlist=[name]), name)
        _, live = stage_options(deployment, args, key)
        inputs[name] = {"settings": settings, "base_config": deep_merge(live, overrides.get(name))}
    return inputs


def build_stage(name: str, settings: dict, base_config: dict, timeout_s: float) -> dict[str, Any]:
    """In this process: start stage `name`, wait for every warm-up, write its files (and wait for the
    shared store's copies). What it did, for the report."""
    from deployments.runtime import compile_cache

    compile_cache.rebuild_files()
    _, module = STAGES[name]
    deployment = getattr(__import__(module, fromlist=[name]), name)
    started = time.perf_counter()
    stage = deployment.func_or_class(settings, base_config)
    warmups = [stage.after_ready] + [w for w in (getattr(stage, "shape_warmup", None),) if w is not None]
    warm = all(warmup.wait(timeout_s) for warmup in warmups)
    compile_cache.save_every_artifact()  # what the warm-ups after the stage's own saves compiled
    uploaded = compile_cache.wait_for_uploads(timeout_s)
    stats = stage.stats()
    return {"stage": name, "warm": warm, "uploaded": uploaded, "seconds": round(time.perf_counter() - started, 1),
            "speed": stage.speed_label, "config": stats["config"], "start_phases": stats["start_phases"],
            "compile": stats["compile"], "files": stats["compile_cache"]}


def run_stage(name: str, inputs: dict, timeout_s: float) -> dict[str, Any]:
    """`build_stage` in a fresh interpreter; its report, or the error it stopped with."""
    spec = json.dumps({**inputs, "timeout_s": timeout_s})
    done = subprocess.run([sys.executable, "-m", "serve_app.cache_build", "_stage", name, spec],
                          capture_output=True, text=True, timeout=timeout_s * 2 + 600)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    return {"stage": name, "error": (done.stderr or done.stdout)[-3000:] or f"exit status {done.returncode}"}


def report_line(result: dict) -> str:
    if "error" in result:
        return f"{result['stage']:<12} failed: {result['error'].strip().splitlines()[-1]}"
    counts, phases = result["compile"], result["start_phases"]
    files = "; ".join(f"{f['file']} -> {', '.join(f['written_to']) or 'not written'}" for f in result["files"].values())
    return (f"{result['stage']:<12} {result['speed']}: ready {phases['ready_s']:.1f} s, all warm-ups "
            f"{result['seconds']:.1f} s; compiled {counts['fx_misses']} graphs (cache hits {counts['fx_hits']}), "
            f"compile {counts['compile_s']:.1f} s of which dynamo {counts['dynamo_s']:.1f} s; "
            f"{files or 'nothing compiled'}")


def build(args: argparse.Namespace) -> int:
    inputs = stage_inputs(application(args.config, args.app))
    names = [name for name in STAGES if name in args.stages.split(",")]
    results = []
    for name in names:
        print(f"building {name} ...", flush=True)
        results.append(run_stage(name, inputs[name], args.timeout_s))
        print("  " + report_line(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if any("error" in r or not r["warm"] or not r["uploaded"] for r in results):
        return 1
    unwritten = [f"{f['file']}: {problem}" for r in results for f in r["files"].values() for problem in f["problems"]]
    if unwritten:  # a store that could not be written: the rollout would not find these files there
        print("not written everywhere: " + "; ".join(unwritten))
        return 1
    if not any(r["files"] for r in results):
        print("nothing was compiled (no GPU here, or compile off): there is no compile cache to build")
        return 2
    return 0


def list_files(args: argparse.Namespace) -> int:
    """The files in this node's cache directory and the shared store, with their sizes."""
    from deployments.runtime.artifact_store import DirectoryStore, StoreUnavailable, shared_store
    from serve_app.config import AppArgs

    settings = AppArgs.from_args(application(args.config, args.app).get("args") or {}).model_settings()
    stores = [DirectoryStore(Path(settings.compile_cache_dir()) / "mega"), shared_store(settings.compile_cache)]
    for store in filter(None, stores):
        try:
            names = store.names()
        except StoreUnavailable as exc:
            print(f"{store.where}: unavailable ({exc})")
            continue
        print(f"{store.where}: {len(names)} files")
        for name, size in sorted(names.items()):
            print(f"  {name}  {size / 2**20:.1f} MiB")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_stage"]:  # one stage's build, in the process `run_stage` started
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        spec = json.loads(argv[2])
        result = build_stage(argv[1], spec["settings"], spec["base_config"], spec["timeout_s"])
        print("RESULT " + json.dumps(result, default=str), flush=True)
        return
    parser = argparse.ArgumentParser(prog="zimage-serve-cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("build", "list"):
        sub = commands.add_parser(command)
        sub.add_argument("--config", default="serve_config.yaml", help="a Serve config file (serve_config.yaml)")
        sub.add_argument("--app", default=None, help="its application's name (default: its first)")
        if command == "build":
            sub.add_argument("--stages", default=",".join(STAGES), help="which model stages, comma separated")
            sub.add_argument("--timeout-s", type=float, default=3600, help="per stage, for its warm-ups")
            sub.add_argument("--json", default=None, help="write the stages' reports here too")
    args = parser.parse_args(argv)
    sys.exit(build(args) if args.command == "build" else list_files(args))


if __name__ == "__main__":
    main()
