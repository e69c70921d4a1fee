"""Each benchmark's documented CPU smoke run, as its docstring writes it, so that a benchmark that no
longer runs (an API it calls renamed, a setting gone) fails here and not on the GPU machine: the
smoke runs go through the same settings and stage code as the GPU runs (`auto` resolved on the CPU).

bench_controlnet, bench_lora and bench_stages run as subprocesses started together (one thread
each: together they take about what the slowest takes alone on two cores); bench_first_run, which
starts `serve run` several times, has its arguments and the commands it would run checked against the
application's own validation, and its verdicts read from a recorded GPU run's JSON.
"""

from __future__ import annotations

import ast
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT_S = 480  # all three together; about a minute on two idle cores
# benchmark -> (its file, the option naming where it writes its JSON)
SMOKES = {"bench_controlnet": ("benchmarks/bench_controlnet.py", "--json"),
          "bench_lora": ("benchmarks/bench_lora.py", "--out"),
          "bench_stages": ("benchmarks/bench_stages.py", "--json")}


def documented_smoke(path: str) -> list[str]:
    """The command in the module docstring whose line is marked `# smoke`, continuations joined."""
    doc = ast.get_docstring(ast.parse((ROOT / path).read_text()))
    commands = doc.replace("\\\n", " ").splitlines()
    found = [line.split("#", 1)[0] for line in commands if line.strip().startswith("python")
             and "# smoke" in line]
    assert len(found) == 1, f"{path}: expected one command marked '# smoke' in its docstring, found {found}"
    command = shlex.split(found[0])
    return [sys.executable, *command[1:]]


@pytest.fixture(scope="module")
def smoke_runs(cache_dir, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every smoke run, started at once; each with its output (returncode None: stopped at the time
    limit), and the JSON it wrote."""
    out = tmp_path_factory.mktemp("smoke")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ZIMAGE_CACHE_DIR": str(cache_dir)}
    started, killed = {}, set()
    try:
        for name, (path, json_option) in SMOKES.items():
            log = open(out / f"{name}.log", "w+")
            command = [*documented_smoke(path), json_option, str(out / f"{name}.json")]  # the last one wins
            started[name] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        deadline = time.monotonic() + SMOKE_TIMEOUT_S
        for process, _ in started.values():
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for name, (process, _) in started.items():
            if process.poll() is None:
                killed.add(name)
                process.kill()
                process.wait()
    runs = {}
    for name, (process, log) in started.items():
        log.seek(0)
        code = None if name in killed else process.returncode
        runs[name] = (subprocess.CompletedProcess(process.args, code, log.read()), out / f"{name}.json")
        log.close()
    return runs


def finished(runs, name: str) -> dict:
    run, result = runs[name]
    outcome = f"ran past {SMOKE_TIMEOUT_S} s" if run.returncode is None else f"exited with {run.returncode}"
    assert run.returncode == 0, f"{name} smoke run {outcome}:\n{run.stdout[-4000:]}"
    return json.loads(result.read_text())


def test_bench_controlnet_smoke_measures_every_figure_through_the_served_stages(smoke_runs):
    data = finished(smoke_runs, "bench_controlnet")
    assert "precision=float32" in data["meta"]["denoiser_speed"]  # `auto`, resolved by the settings on the CPU
    figures = [row["figure"] for row in data["verdicts"]]
    assert len(figures) == 4 and sum("first controlled request" in f for f in figures) == 2
    assert all(math.isfinite(row["ratio"]) and row["ratio"] > 0 and isinstance(row["met"], bool)
               for row in data["verdicts"])
    assert data["step"]["flops"]["ratio"] > 1.2  # the ControlNet's blocks, counted
    assert data["step"]["plain_graphs"] is None  # no CUDA graphs on the CPU, said as such
    table = smoke_runs["bench_controlnet"][0].stdout
    for row in data["verdicts"]:  # the printed table: each figure with its verdict
        assert any(row["figure"] in line and line.rstrip().endswith("met" if row["met"] else "NOT MET")
                   for line in table.splitlines()), row


def test_bench_lora_smoke_measures_every_target_on_the_resolved_default_path(smoke_runs):
    data = finished(smoke_runs, "bench_lora")
    figures = data["figures"]
    assert all(math.isfinite(value) and value > 0 for value in figures.values()), figures
    assert data["meta"]["speed"]["precision"]["value"] == "float32"  # `auto`, resolved by the settings on the CPU
    assert set(data["met"]) == set(data["targets"]) == {"b1_ratio", "b8_ratio", "unseen_minus_cached_s"}
    assert all(data["met"][name] == (figures[name] <= target) for name, target in data["targets"].items())
    table = smoke_runs["bench_lora"][0].stdout
    for name, met in data["met"].items():  # the printed table: each target's row with its verdict
        assert any(line.startswith(name) and line.rstrip().endswith("yes" if met else "NO")
                   for line in table.splitlines()), (name, table[-2000:])


def test_bench_stages_smoke_runs_every_section(smoke_runs):
    data = finished(smoke_runs, "bench_stages")
    assert not [note for note in data["notes"] if "failed" in note or ("skipped:" in note and "budget" in note)]
    variants = {(row["stage"], row["variant"]) for row in data["rows"]}
    assert {("dit_step", "plain_bf16_eager"), ("dit_step", "ours_bf16"), ("text_encoder", "ours_truncated"),
            ("vae_decode", "ours_compiled")} <= variants


def test_bench_first_run_arguments_and_the_commands_it_starts():
    """Its two starts are what a user runs: the README's `serve run serve_app:build_app key=value`
    and serve_config.yaml with the model and device set; both pass the application's validation."""
    from ray.serve.schema import ServeDeploySchema

    from benchmarks.bench_first_run import parse_args, start_commands
    from serve_app.config import AppArgs

    args = parse_args(["--model", "tiny", "--device", "cpu", "--unseen", "3,2", "--starts", "serve_config,readme"])
    assert args.unseen == (3, 2)
    (first, config_command, app, *_), (second, readme_command, readme_app, *_) = start_commands(args)
    assert (first, second, app, readme_app) == ("serve_config", "readme", "zimage", "default")
    assert readme_command[:3] == ["serve", "run", "serve_app:build_app"]
    assert "serve run serve_app:build_app" in (ROOT / "README.md").read_text()
    readme_args = dict(token.split("=", 1) for token in readme_command[3:])
    assert AppArgs.from_args(readme_args).model_settings().device == "cpu"
    config = ServeDeploySchema.model_validate(yaml.safe_load(Path(config_command[2]).read_text()))
    served = config.applications[0]
    assert served.import_path == "serve_app:build_app" and config.http_options.host == "127.0.0.1"
    assert AppArgs.from_args(served.args).model_settings().model == "tiny"
    for bad in (["--starts", "readme,warm"], ["--unseen", "30"], ["--unseen", "a,b"], ["--requests", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_bench_first_run_measures_the_first_request_at_every_warm_up_size():
    """By default the starts the issue's figures need; the new node's first requests cover every size a
    replica warms up for (before ready and after it), each once."""
    from benchmarks.bench_first_run import README_STARTS, parse_args, warmup_sizes
    from deployments.geometry import SIZE_PRESETS, format_size
    from deployments.settings import ModelSettings

    assert parse_args([]).starts == list(README_STARTS) == ["readme", "readme_warm", "new_node"]
    sizes = warmup_sizes()
    assert len(sizes) == len(set(sizes))
    assert set(sizes) == set(ModelSettings().warmup_sizes) | {format_size(w, h) for w, h in SIZE_PRESETS}


VERDICT_KEYS = {"ready_cold_s", "ready_second_s", "p50_second_vs_cold_512x512", "p50_second_vs_cold_1024x1024",
                "builder_s", "new_node_TextEncoder_s", "new_node_Denoiser_s", "new_node_VaeDecoder_s",
                "new_node_first_vs_warm"}


def test_bench_first_run_verdicts_say_what_was_not_measured():
    """A recorded budget-only run of `readme` and `new_node` (one H100): what it measured is judged, what
    it did not (the second start, the p50s, the first requests) is "not measured", never met; the
    printed table says each verdict."""
    from benchmarks.bench_first_run import format_verdicts, verdicts

    recorded = json.loads((ROOT / "benchmarks/results/2026-12-07-h100-5/first_run/start_budget.json").read_text())
    rows = verdicts(recorded)
    assert set(rows) == VERDICT_KEYS
    assert (rows["ready_cold_s"]["value"], rows["ready_cold_s"]["met"]) == (63.4, True)
    assert rows["builder_s"]["value"] == 0.4 and rows["builder_s"]["met"] is True  # 2.2 s to 2.6 s after serve run
    assert [rows[f"new_node_{s}_s"]["value"] for s in ("TextEncoder", "Denoiser", "VaeDecoder")] == [21.7, 31.1, 20.2]
    assert not any(rows[f"new_node_{s}_s"]["met"] for s in ("TextEncoder", "Denoiser", "VaeDecoder"))
    unmeasured = {"ready_second_s", "p50_second_vs_cold_512x512", "p50_second_vs_cold_1024x1024",
                  "new_node_first_vs_warm"}
    for key in unmeasured:
        assert rows[key]["value"] is None and rows[key]["met"] is None and rows[key]["verdict"] == "not measured"
    table = format_verdicts(rows).splitlines()
    for row in rows.values():
        assert any(line.startswith(row["figure"]) and line.rstrip().endswith(row["verdict"]) for line in table), row
    assert sum(line.endswith("not measured") for line in table) == len(unmeasured)


def test_bench_first_run_verdicts_compare_the_second_start_with_the_cold_one():
    """The p50 target compares `readme_warm` with `readme` (not serve_config), within 3% either way; the
    new node's first requests are judged by the worst warm-up size."""
    from benchmarks.bench_first_run import verdicts

    recorded = json.loads((ROOT / "benchmarks/results/2026-12-07-h100-5/first_run/start_budget.json").read_text())
    cold = {**recorded["readme"], "c1 512x512": {"p50_ms": 100.0}, "c1 1024x1024": {"p50_ms": 400.0}}
    second = {"ready_s": 44.9, "c1 512x512": {"p50_ms": 97.0}, "c1 1024x1024": {"p50_ms": 413.0}}
    new_node = {**recorded["new_node"], "first": [{"size": "512x512", "ratio": 1.02},
                                                  {"size": "2048x2048", "ratio": 1.41}]}
    serve_config = {"ready_s": 40.0, "c1 512x512": {"p50_ms": 50.0}, "c1 1024x1024": {"p50_ms": 200.0}}
    rows = verdicts({"readme": cold, "readme_warm": second, "new_node": new_node, "serve_config": serve_config})
    assert rows["ready_second_s"]["met"] is True
    assert (rows["p50_second_vs_cold_512x512"]["value"], rows["p50_second_vs_cold_512x512"]["met"]) == (0.97, True)
    assert (rows["p50_second_vs_cold_1024x1024"]["value"], rows["p50_second_vs_cold_1024x1024"]["met"]) == (1.032, False)
    worst = rows["new_node_first_vs_warm"]
    assert (worst["value"], worst["met"]) == (1.41, False) and "2048x2048" in worst["figure"]
    assert rows["builder_s"]["value"] == 0.4  # the worst README-command start; readme_warm has no budget here
