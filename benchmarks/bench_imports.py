"""What each process of the application imports, and how long it takes (`python -X importtime`).

    python benchmarks/bench_imports.py --json imports.json                 # this checkout, CPU, model tiny
    python benchmarks/bench_imports.py --root /path/to/other/checkout      # the same for another commit

For the builder (`serve_app.builder`, what `serve run` / `serve deploy` import) and each stage's
replica, one fresh interpreter each, with Ray Serve imported first as a replica's worker has it:
- `module_s`: importing the module Serve names (the stage's deployment class);
- `start_s`: imports while the stage starts (its constructor: load, optimize, warm-up), where a
  replica imports its model code; the Ingress: `serve_app.replica_imports`; the builder: `build_app`
  on serve_config.yaml's args;
- which heavy packages were loaded, and modules of another stage's package (a replica should import
  only its own stage's code).
Seconds are -X importtime's cumulative figures of the top-level imports in each part (wall clock),
and the process's CPU seconds in each part (`cpu s`: module + start; the start's includes the work
besides imports: loading, warming). A loaded machine stretches the wall-clock figures much more than
the CPU ones: compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run_info import commit_of  # noqa: E402
HEAVY = ("torch", "diffusers", "transformers", "torchao", "triton", "safetensors", "accelerate", "imagecodecs",
         "cv2", "PIL", "numpy", "ray", "fastapi")
STAGE_PACKAGES = ("deployments.style", "deployments.text_encoder", "deployments.denoiser", "deployments.vae")
MARK = "BENCH-IMPORTS-MARK"

# name: (module Serve imports, the stage's own package or None, code that starts it)
PROCESSES = {
    "builder": ("serve_app.builder", None,
                "import yaml; from pathlib import Path; from serve_app.builder import build_app\n"
                "build_app(yaml.safe_load(Path('serve_config.yaml').read_text())['applications'][0]['args'])"),
    "Ingress": ("serve_app.ingress", None,  # (a checkout without replica_imports imports it all with the module)
                "try:\n    from serve_app.replica_imports import import_request_path\nexcept ImportError:\n"
                "    import_request_path = lambda: None\nimport_request_path()"),
    "PromptStyler": ("deployments.style.deployment", "deployments.style",
                     "from deployments.style.deployment import PromptStyler; PromptStyler.func_or_class()"),
    "TextEncoder": ("deployments.text_encoder.deployment", "deployments.text_encoder",
                    "from deployments.text_encoder.deployment import TextEncoder\n"
                    "TextEncoder.func_or_class({'model': 'tiny', 'device': 'cpu'})"),
    "Denoiser": ("deployments.denoiser.deployment", "deployments.denoiser",
                 "from deployments.denoiser.deployment import Denoiser\n"
                 "Denoiser.func_or_class({'model': 'tiny', 'device': 'cpu'})"),
    "VaeDecoder": ("deployments.vae.deployment", "deployments.vae",
                   "from deployments.vae.deployment import VaeDecoder\n"
                   "VaeDecoder.func_or_class({'model': 'tiny', 'device': 'cpu'})"),
}


def script(module: str, start: str) -> str:
    return "\n".join([
        "import sys, json, time",
        "import ray.serve  # a replica's worker has it before our code",
        f"sys.stderr.write('{MARK} module\\n'); sys.stderr.flush()",
        "cpu = [time.process_time()]",
        f"import {module}",
        "cpu.append(time.process_time())",
        f"sys.stderr.write('{MARK} start\\n'); sys.stderr.flush()",
        start,
        "cpu.append(time.process_time())",
        f"sys.stderr.write('{MARK} end\\n'); sys.stderr.flush()",
        "print('CPU ' + json.dumps([cpu[1] - cpu[0], cpu[2] - cpu[1]]))",
        "print('MODULES ' + json.dumps(sorted(sys.modules)))",
    ])


def top_level_seconds(lines: list[str]) -> float:
    """Sum of the cumulative microseconds of the top-level imports among -X importtime's lines
    (`import time: <self us> | <cumulative us> | <name, indented under its importer>`)."""
    total = 0
    for line in lines:
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if not name[1:].startswith(" "):
            total += int(cumulative.strip())
    return total / 1e6


def measure(root: Path, name: str, env: dict) -> dict:
    module, own, start = PROCESSES[name]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", script(module, start)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    parts: dict[str, list[str]] = {}
    current = "ray"
    for line in done.stderr.splitlines():
        if line.startswith(MARK):
            current = line.split()[1]
            continue
        parts.setdefault(current, []).append(line)
    modules = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("MODULES "))[8:])
    module_cpu, start_cpu = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("CPU "))[4:])
    tops = {m.split(".")[0] for m in modules}
    others = sorted({pkg for pkg in STAGE_PACKAGES if pkg != own and any(m.startswith(pkg + ".") for m in modules)})
    return {"module": module, "module_s": round(top_level_seconds(parts.get("module", [])), 3),
            "start_s": round(top_level_seconds(parts.get("start", [])), 3),
            "module_cpu_s": round(module_cpu, 3), "start_cpu_s": round(start_cpu, 3),
            "heavy": [pkg for pkg in HEAVY if pkg in tops], "other_stages": others,
            "modules": len(modules), "wall_s": round(wall_s, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT), help="the checkout to measure (default: this one)")
    parser.add_argument("--processes", default=",".join(PROCESSES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    env = {**os.environ, "PYTHONPATH": str(root), "ZIMAGE_CACHE_DIR": os.environ.get("ZIMAGE_CACHE_DIR")
           or tempfile.mkdtemp(prefix="zimage-imports-")}
    data = {"meta": {"root": str(root), "commit": commit_of(root), "python": sys.version.split()[0],
                     "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, "rows": {}}
    print(f"{'process':<13} {'module s':>9} {'start s':>8} {'cpu s':>12}  heavy packages loaded; other stages' code")
    for name in args.processes.split(","):
        row = data["rows"][name] = measure(root, name, env)
        if "error" in row:
            print(f"{name:<13} error: {row['error'][-300:]}")
            continue
        cpu = f"{row['module_cpu_s']:.2f}+{row['start_cpu_s']:.2f}"
        print(f"{name:<13} {row['module_s']:>9.2f} {row['start_s']:>8.2f} {cpu:>12}  {' '.join(row['heavy'])}"
              f"{'; ' + ' '.join(row['other_stages']) if row['other_stages'] else ''}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
