"""A new user's first run on a GPU, timed as the user meets it: `serve run` as the README writes it, each
start a process of its own on 127.0.0.1:8000, against issue 30's targets (a verdict table at the end).

    python benchmarks/bench_first_run.py --json first_run.json            # every target, one GPU, model=random
    python benchmarks/bench_first_run.py --json start_budget.json --starts readme,readme_warm,new_node --budget-only
    python benchmarks/bench_first_run.py --json before.json --root <a checkout of an earlier commit> \
        --starts readme,readme_warm --budget-only      # the same start-up budget of that commit

The first command measures every figure below in one run (the default starts); the second only the
budgets, so its p50 and first-request targets are "not measured". The builder's imports in detail,
module by module: `python benchmarks/bench_imports.py --processes builder`.

Starts (`--starts`, in order; default readme,readme_warm,new_node): `readme`, the README's command with a
fresh ZIMAGE_CACHE_DIR (cold); `readme_warm`, the same again on that directory (the second start on a
machine); `new_node`, the same with another fresh ZIMAGE_CACHE_DIR (fresh inductor and Triton caches)
whose `compile_cache` is the first directory's compiled-artifact files, as a node that fetches them from
a shared store; `serve_config`, serve_config.yaml on the first directory (its bucket replaced by those files).

For each start: its budget (benchmarks/start_budget.py: from `serve run` to ready, the application's
milestones, and each replica from the controller's request to its ready, phase by phase, compile
and dynamo's part of it apart), printed as tables and kept in the JSON; seconds from `serve run` to
`/health/ready` answering 200, each stage's start phases and compile counts (FX-graph cache hits and
misses), the seconds after that until every warm-up after ready is done (the next start's compile
cache is complete only then; the measurements below start then; `--no-wait-warm` starts them at
ready, while those warm-ups still take turns on the GPU), and, unless `--budget-only`:
  first      on `readme` and `new_node`, before any other request: the first request at each warm-up
             size (the default `warmup_sizes` and the 18 presets) and an edit, against the same again;
  c1         the 1-client p50/p90 at 512x512 and 1024x1024, with a repeating prompt set as loadgen
             sends it and then with loadgen's fresh prompts (each request a prompt never sent before,
             `c1 <size> fresh`);
  unseen     on `readme`: prompts of token lengths the replica has not seen, each sent twice: first
             against repeat, p50 and p90 (first at most 1.1x the repeat), 30 lengths at 512x512, 15 at
             1024x1024.

Verdicts (`verdicts` in the JSON, one per target: figure, value, target, met; a figure this run did
not measure is "not measured", `met` null, never met):
  - `readme` ready <= 75 s from `serve run`; `readme_warm` ready <= 45 s;
  - the 1-client p50 (repeating prompts) of `readme_warm` within 3% of `readme`'s, at each size;
  - `serve run` importing and building the application (the builder) <= 2 s, the worst of the
    README-command starts (from "Running import path" to build_app's line);
  - `new_node`: each model stage's replica from the controller's request to ready <= 20 s, and its
    first request at every warm-up size at most 1.3x the same request warm (the worst size).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import LoadConfig, load_prompts, parse_size_mix, run_load  # noqa: E402
from benchmarks.run_info import commit, commit_of  # noqa: E402
from benchmarks.start_budget import TimedOutput, budget, format_budget  # noqa: E402
from deployments.geometry import SIZE_PRESETS, format_size  # noqa: E402
from deployments.settings import ModelSettings  # noqa: E402  (no torch: the builder imports it too)

URL = "http://127.0.0.1:8000"
WORDS = ("lighthouse harbour granite tide lantern gull cliff storm amber dusk quiet shore pine meadow river "
         "copper glass velvet ember frost orchard tower bridge market canal lantern willow falcon cedar").split()


def serve_run(command: list[str], log_path: Path, env: dict, cwd: Path) -> tuple[subprocess.Popen, TimedOutput]:
    """`serve run ...` in `cwd`, in its own process group; its output to a log file, each line timed on arrival."""
    output = TimedOutput(time.time())
    process = subprocess.Popen(command, cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output.follow(process.stdout, log_path)
    return process, output


def wait_ready(process: subprocess.Popen, timeout_s: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"serve run exited with {process.returncode}")
        try:
            if httpx.get(f"{URL}/health/ready", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError("not ready")


def stop(process: subprocess.Popen, ray_tmp: str) -> None:
    """Ctrl-C, as a user stops `serve run`; then make sure none of this start's Ray processes (their
    command lines name its RAY_TMPDIR) is left for the next start. Other Ray instances are left alone."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while ray_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(1)
    for pid in ray_processes(ray_tmp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def ray_processes(ray_tmp: str) -> list[int]:
    """Live processes whose command line names `ray_tmp` (Ray's processes of one instance)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if ray_tmp.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stages_info(app: str, env: dict) -> dict:
    """Each stage's start phases and resolved speed settings, read through Ray as an operator would."""
    code = (
        "import json, ray; from ray import serve; ray.init(address='auto', logging_level='ERROR'); out = {}\n"
        "for name in ('TextEncoder', 'Denoiser', 'VaeDecoder'):\n"
        f"    s = serve.get_deployment_handle(name, {app!r}).stats.remote().result(timeout_s=60)\n"
        "    out[name] = {k: s.get(k) for k in ('start_phases', 'speed', 'fp8_kernels', 'step_graphs',\n"
        "                                        'warm_after_ready', 'shape_warmup', 'compile', 'compile_cache')}\n"
        "print('STAGES ' + json.dumps(out, default=str))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("STAGES ")]
    return json.loads(lines[-1].removeprefix("STAGES ")) if lines else {"error": out.stderr[-2000:]}


def wait_warm(app: str, timeout_s: float, env: dict) -> float:
    """Seconds until every stage's warm-up after ready is done (the batched graphs, the VAE's dynamic
    graph, the Denoiser's caption-bucket graphs and preset forwards), polled through Ray."""
    code = (
        "import time, ray; from ray import serve; ray.init(address='auto', logging_level='ERROR')\n"
        "start = time.perf_counter()\n"
        f"while time.perf_counter() - start < {timeout_s}:\n"
        "    stats = [serve.get_deployment_handle(n, %r).stats.remote().result(timeout_s=60)\n"
        "             for n in ('TextEncoder', 'Denoiser', 'VaeDecoder')]\n"
        "    if all((s.get(k) or {'ready': True})['ready'] for s in stats for k in ('warm_after_ready', 'shape_warmup')):\n"
        "        break\n"
        "    time.sleep(1)\n"
        "print('WARM', time.perf_counter() - start)\n" % app
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s + 120, cwd=ROOT,
                   env=env)
    return time.perf_counter() - started


def p50_p90(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def single_client(size: str, requests: int, prompts: list[str], fresh: bool = False) -> dict:
    """1-client p50/p90 with the repeating prompt set, or (`fresh`) a prompt never sent before each time."""
    config = LoadConfig(url=URL, concurrency=1, requests=requests, warmup=2, size_mix=parse_size_mix(size),
                        steps=8, prompts=prompts, label=f"c1 {size}", timeout_s=300, fresh_prompts=fresh)
    report = asyncio.run(run_load(config)).to_dict()
    return {"p50_ms": round(report["latency"]["p50_ms"], 1), "p90_ms": round(report["latency"]["p90_ms"], 1),
            "errors": report["failed"]}


def timed(client: httpx.Client, path: str, **kwargs) -> float:
    start = time.perf_counter()
    response = client.post(path, **kwargs)
    elapsed = (time.perf_counter() - start) * 1000
    response.raise_for_status()
    return elapsed


def unseen_lengths(client: httpx.Client, size: str, count: int, offset: int) -> dict:
    """`count` prompts of distinct word counts (so distinct token lengths), each new to the server, sent
    twice in a row: the first pays whatever a new caption length costs, the second is the repeat."""
    first, repeat = [], []
    for i in range(count):
        words = 3 + 4 * i + offset  # 3..120 words
        prompt = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words)) + f" number {offset}-{i}"
        body = {"prompt": prompt, "size": size, "seed": i, "num_inference_steps": 8}
        first.append(timed(client, "/v1/images/generations", json=body))
        repeat.append(timed(client, "/v1/images/generations", json=body))
    (f50, f90), (r50, r90) = p50_p90(first), p50_p90(repeat)
    return {"size": size, "count": count, "first_p50_ms": round(f50, 1), "first_p90_ms": round(f90, 1),
            "repeat_p50_ms": round(r50, 1), "repeat_p90_ms": round(r90, 1),
            "ratio_p50": round(f50 / r50, 3), "ratio_p90": round(f90 / r90, 3)}


def warmup_sizes() -> list[str]:
    """Every size a replica warms up for with the README's settings: `warmup_sizes` before ready, the
    presets after it."""
    sizes = list(ModelSettings.model_fields["warmup_sizes"].default)
    return sizes + [format_size(w, h) for w, h in SIZE_PRESETS if format_size(w, h) not in sizes]


def first_at_warmup_sizes(client: httpx.Client) -> list[dict]:
    """The first request at each warm-up size and an edit, against the same requests again: whatever a
    first request at a warm size still pays (a compile, a graph capture, a cache fetched late)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((1024, 1024)).convert("RGB").save(buffer, format="PNG")
    upload = buffer.getvalue()

    def one_pass() -> dict[str, float]:
        times = {}
        for size in warmup_sizes():
            body = {"prompt": "a lighthouse on a rocky coast at dusk", "size": size, "seed": 1}
            times[size] = timed(client, "/v1/images/generations", json=body)
        edit = {"prompt": "the same lighthouse as an oil painting", "seed": "1", "strength": "0.6"}
        times["edit 1024x1024"] = timed(client, "/v1/images/edits", data=edit,
                                        files={"image": ("in.png", upload, "image/png")})
        return times

    first, warm = one_pass(), one_pass()
    return [{"size": k, "first_ms": round(first[k], 1), "warm_ms": round(warm[k], 1),
             "ratio": round(first[k] / warm[k], 3)} for k in first]


def served_config(root: Path, model: str, device: str, shared: Path) -> Path:
    """`root`'s serve_config.yaml on this machine: its bucket for compiled code (if it names one)
    replaced by a directory."""
    config = yaml.safe_load((root / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    args.update(model=model, device=device)
    if "compile_cache" in args:
        args["compile_cache"] = {"directory": str(shared)}
    config["http_options"]["host"] = "127.0.0.1"
    path = Path(tempfile.mkdtemp()) / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


START_LABELS = ("readme", "readme_warm", "new_node", "serve_config")
README_STARTS = ("readme", "readme_warm", "new_node")  # the README's command: the builder runs in `serve run`
MODEL_STAGES = ("TextEncoder", "Denoiser", "VaeDecoder")
C1_SIZES = ("512x512", "1024x1024")


def builder_s(result: dict) -> float | None:
    """Seconds `serve run` took to import and build the application: from its "Running import path"
    line to build_app's (a config file's start builds it in the controller, so it has no such figure)."""
    at = {row["step"]: row["at_s"] for row in result.get("budget", {}).get("app", [])}
    if at.get("CLI started") is None or at.get("application imported and built") is None:
        return None
    return round(at["application imported and built"] - at["CLI started"], 1)


def verdicts(data: dict) -> dict[str, dict]:
    """Each of issue 30's targets (the module docstring) against this run's figure: `met` is None where
    the run did not measure the figure, so a start left out or cut short never reads as met."""
    cold, second, new_node = (data.get(label, {}) for label in ("readme", "readme_warm", "new_node"))
    rows: dict[str, dict] = {}

    def add(key: str, figure: str, value: float | None, target: str, met) -> None:
        ok = None if value is None else bool(met(value))
        rows[key] = {"figure": figure, "value": value, "target": target, "met": ok,
                     "verdict": "not measured" if ok is None else "met" if ok else "not met"}

    add("ready_cold_s", "readme (empty cache): serve run to ready, s", cold.get("ready_s"), "<= 75",
        lambda v: v <= 75)
    add("ready_second_s", "readme_warm (second start): serve run to ready, s", second.get("ready_s"), "<= 45",
        lambda v: v <= 45)
    for size in C1_SIZES:
        key = f"c1 {size}"
        ratio = (round(second[key]["p50_ms"] / cold[key]["p50_ms"], 3) if key in cold and key in second else None)
        add(f"p50_second_vs_cold_{size}", f"c1 {size} p50, readme_warm / readme", ratio, "within 3%",
            lambda v: 0.97 <= v <= 1.03)
    imports = [s for label in README_STARTS if label in data and (s := builder_s(data[label])) is not None]
    add("builder_s", "serve run: importing and building the application, s", max(imports, default=None), "<= 2",
        lambda v: v <= 2)
    replicas = new_node.get("budget", {}).get("replicas", {})
    for stage in MODEL_STAGES:
        add(f"new_node_{stage}_s", f"new_node {stage}: request to ready, s",
            replicas.get(stage, {}).get("request_to_ready_s"), "<= 20", lambda v: v <= 20)
    worst = max(new_node.get("first", []), key=lambda row: row["ratio"], default=None)
    add("new_node_first_vs_warm", "new_node: first request / warm, worst warm-up size"
        + (f" ({worst['size']})" if worst else ""), None if worst is None else worst["ratio"], "<= 1.3",
        lambda v: v <= 1.3)
    return rows


def format_verdicts(rows: dict[str, dict]) -> str:
    width = max(len(row["figure"]) for row in rows.values())
    lines = [f"{'target':<{width}}  {'value':>8}  {'limit':<10} verdict"]
    for row in rows.values():
        value = "" if row["value"] is None else f"{row['value']:g}"
        lines.append(f"{row['figure']:<{width}}  {value:>8}  {row['target']:<10} {row['verdict']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random")
    parser.add_argument("--device", default="cuda", help="the README's command's device (cpu for a smoke run)")
    parser.add_argument("--requests", type=int, default=20, help="1-client requests per size")
    parser.add_argument("--unseen", default="30,15", help="unseen lengths at 512x512 and 1024x1024")
    parser.add_argument("--ready-timeout", type=float, default=400)
    parser.add_argument("--starts", default=",".join(README_STARTS), help=f"which starts, in order: {START_LABELS}")
    parser.add_argument("--json", default="first_run.json")
    parser.add_argument("--root", default=None, help="serve another checkout of this project (an earlier commit: "
                        "its application and replicas import from there; the tables are this checkout's; "
                        "new_node needs a checkout with the compile_cache setting)")
    parser.add_argument("--no-wait-warm", action="store_true",
                        help="measure right after ready, while the warm-ups after ready still run")
    parser.add_argument("--budget-only", action="store_true",
                        help="each start's budget and stats only (and its warm-ups after ready, unless --no-wait-warm): "
                             "no requests")
    args = parser.parse_args(argv)
    args.starts = [label.strip() for label in args.starts.split(",") if label.strip()]
    unknown = [label for label in args.starts if label not in START_LABELS]
    if unknown or not args.starts:
        parser.error(f"--starts takes some of {', '.join(START_LABELS)}; got {unknown or 'none'}")
    try:
        args.unseen = tuple(int(count) for count in args.unseen.split(","))
    except ValueError:
        args.unseen = ()
    if len(args.unseen) != 2 or min(args.unseen) < 1 or args.requests < 1:
        parser.error("--unseen takes two positive counts (512x512, 1024x1024); --requests a positive count")
    return args


def start_commands(args: argparse.Namespace, root: Path = ROOT) -> list[tuple[str, list[str], str, str, str]]:
    """(label, `serve run` command, application name, its ZIMAGE_CACHE_DIR, the cache it starts with) of
    each start asked for, in order (see the module docstring)."""
    first_dir = tempfile.mkdtemp(prefix="zimage-first-run-")
    shared = Path(first_dir) / "compile" / "mega"  # the first start's files: a new node's shared store
    readme = ["serve", "run", "serve_app:build_app", f"model={args.model}", f"device={args.device}"]
    starts = {
        "readme": (readme, "default", first_dir, "cold"),
        "readme_warm": (readme, "default", first_dir, "warm"),
        "new_node": (readme + [f"compile_cache.directory={shared}"], "default",
                     tempfile.mkdtemp(prefix="zimage-new-node-"), "new node: fresh directory, shared files"),
        "serve_config": (["serve", "run", str(served_config(root, args.model, args.device, shared))], "zimage",
                         first_dir, "warm"),
    }
    return [(label, *starts[label]) for label in args.starts]


def measure_requests(label: str, result: dict, args: argparse.Namespace, prompts: list[str], save) -> None:
    """A start's requests (the module docstring), into `result`, saved after each figure."""
    with httpx.Client(base_url=URL, timeout=600) as client:
        if label in ("readme", "new_node"):  # before any other request: each is the first at its size
            result["first"] = first_at_warmup_sizes(client)
            worst = max(result["first"], key=lambda r: r["ratio"])
            print(f"  first at each warm-up size: worst first/warm {worst}", flush=True)
            save()
        for size in C1_SIZES:
            for key, fresh in ((f"c1 {size}", False), (f"c1 {size} fresh", True)):
                result[key] = single_client(size, args.requests, prompts, fresh)
                print(f"  {key}: {result[key]}", flush=True)
                save()
        if label == "readme":
            unseen_512, unseen_1024 = args.unseen
            result["unseen"] = [unseen_lengths(client, "512x512", unseen_512, 0),
                                unseen_lengths(client, "1024x1024", unseen_1024, 1)]
            for row in result["unseen"]:
                print(f"  unseen {row}", flush=True)
            save()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.json)
    logs = out.parent
    data: dict = {"meta": {"commit": commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "model": args.model}}

    def save() -> None:
        data["verdicts"] = verdicts(data)  # at every save: a run cut short says what it did not reach
        out.write_text(json.dumps(data, indent=2))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new local Ray instance each start
    root = Path(args.root).resolve() if args.root else ROOT
    if args.root:  # the driver, Ray's workers and so the replicas import that checkout first
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        data["meta"].update(root=str(root), served_commit=commit_of(root))
    prompts = load_prompts(ROOT / "benchmarks" / "prompts.txt")[:40]
    starts = start_commands(args, root)
    for label, command, app, cache_dir, cache in starts:
        ray_tmp = tempfile.mkdtemp(prefix="zfr", dir="/tmp")  # short: Ray's socket paths live under it
        start_env = {**env, "ZIMAGE_CACHE_DIR": cache_dir, "RAY_TMPDIR": ray_tmp}
        process, output = serve_run(command, logs / f"first_run_{label}.log", start_env, root)
        try:
            ready_s = wait_ready(process, args.ready_timeout)
            time.sleep(2)  # the replicas' last log lines reach `serve run` within about a second
            result = {"command": " ".join(command), "cache": cache,
                      "ready_s": round(ready_s, 1), "budget": budget(output.lines), "stages": stages_info(app, start_env)}
            print(f"{label}: ready after {ready_s:.1f} s ({result['cache']} cache)", flush=True)
            print(format_budget(result["budget"]), flush=True)
            if "error" in result["stages"]:
                print(f"  stats not read: {result['stages']['error'][-500:]}", flush=True)
            else:
                print("  compile per stage: " + "; ".join(
                    f"{name} {info.get('compile')}" for name, info in result["stages"].items()), flush=True)
            data[label] = result
            save()
            # Measured with every warm-up after ready done (the time it took said); a start's compile-cache
            # files are complete only then (the VaeDecoder writes its file after its dynamic graph), and the
            # next start reads them.
            if not args.no_wait_warm:
                result["warm_after_ready_s"] = round(wait_warm(app, args.ready_timeout, start_env), 1)
                result["stages_warm"] = stages_info(app, start_env)
                print(f"  every warm-up after ready done {result['warm_after_ready_s']} s later", flush=True)
            data[label] = result
            save()
            if args.budget_only:
                continue
            measure_requests(label, result, args, prompts, save)
        finally:
            stop(process, ray_tmp)
    print("\nsummary")
    for label in args.starts:
        if label in data:
            row = data[label]
            replicas = row["budget"]["replicas"]
            slowest = max(replicas, key=lambda name: replicas[name].get("request_to_ready_s") or 0, default=None)
            if slowest:
                print(f"  {label:<13} slowest replica {slowest}: {replicas[slowest].get('request_to_ready_s')} s "
                      f"from its request to ready")
            print(f"  {label:<13} ready {row['ready_s']:6.1f} s ({row['cache']})  c1 512 p50 "
                  f"{row.get('c1 512x512', {}).get('p50_ms')}  c1 1024 p50 {row.get('c1 1024x1024', {}).get('p50_ms')}")
            if "first" in row:
                over = [r for r in row["first"] if r["ratio"] > 1.3]
                print(f"  {label:<13} first requests over 1.3x warm: {over or 'none'}")
    for row in data.get("readme", {}).get("unseen", []):
        print(f"  unseen {row['size']}: first/repeat p50 {row['ratio_p50']}, p90 {row['ratio_p90']}")
    print("\n" + format_verdicts(data["verdicts"]))


if __name__ == "__main__":
    main()
