"""The README's quick start as a user runs it: `serve run serve_app:build_app` in a process of its
own (its own Ray instance, temporary folder and HTTP port). Ready is answered the moment the command
says the application is ready, the start's budget reads from what it printed, and SIGTERM stops it as
Ctrl-C does: exit status 0, Serve shut down, no stack dump, none of its Ray processes left."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from benchmarks.start_budget import budget, format_budget

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
READY_LINE = "Application 'default' is ready at"
START_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServeRun:
    process: subprocess.Popen
    url: str
    ray_tmp: str
    started: float  # time.time() at launch
    lines: list[str] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # each line's seconds since launch
    ready_seen: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        for line in self.process.stdout:
            self.arrivals.append(time.time() - self.started)
            self.lines.append(line)
            if READY_LINE in line:
                self.ready_seen.set()

    def output(self) -> str:
        return "".join(self.lines)

    def lines_of(self, request_id: str, settle_s: float = 3.0) -> list[str]:
        """The output's lines that carry `request_id`, once its access line is there and `settle_s` more
        have passed (Ray forwards each replica's lines on its own schedule)."""
        deadline = time.monotonic() + 60
        while not any(request_id in line and " access " in line for line in list(self.lines)):
            assert time.monotonic() < deadline, f"no access line for {request_id}:\n{self.output()[-3000:]}"
            time.sleep(0.5)
        time.sleep(settle_s)
        return [line for line in list(self.lines) if request_id in line]

    def ray_processes(self) -> list[str]:
        """Command lines of live processes started for this instance (their paths name its folder)."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError):
                continue
            if entry.name.isdigit() and self.ray_tmp in cmdline:
                found.append(cmdline[:200])
        return found


@pytest.fixture(scope="module")
def serve_run(cache_dir) -> Iterator[ServeRun]:
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="zr", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "ZIMAGE_CACHE_DIR": str(cache_dir), "RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp,
           "PYTHONUNBUFFERED": "1"}
    started = time.time()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/deploy/serve_run_on_port.py"), str(port), "serve_app:build_app"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    run = ServeRun(process, f"http://127.0.0.1:{port}", ray_tmp, started)
    threading.Thread(target=run.read, daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not run.ready_seen.wait(1):
            if process.poll() is not None or time.monotonic() > deadline:
                time.sleep(1)  # the reader has the last lines
                pytest.fail(f"no {READY_LINE!r} line (exit status {process.poll()}):\n{run.output()[-4000:]}")
        yield run
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ready_is_answered_when_the_command_says_ready(serve_run):
    response = httpx.get(f"{serve_run.url}/health/ready", timeout=10)  # right after the line
    assert response.status_code == 200, (response.text, serve_run.output()[-2000:])
    assert response.json()["stages"] == dict.fromkeys(["PromptStyler", "TextEncoder", "Denoiser", "VaeDecoder"], True)
    body = {"prompt": "a lighthouse", "size": "512x512", "num_inference_steps": 2, "seed": 1}
    assert httpx.post(f"{serve_run.url}/v1/images/generations", json=body, timeout=300).status_code == 200


def test_each_request_leaves_one_line_in_its_terminal(serve_run):
    """A generation and a wrong method each add one line that names them, the Ingress's access line
    with the path asked for and the status (Ray's own per-request lines are off: serve_app.builder);
    the start showed no progress bar, no FP8 note on a CPU, and no choice the CPU does not use."""
    ok = httpx.post(f"{serve_run.url}/v1/images/generations", timeout=300, headers={"X-Request-ID": "first-hour-ok"},
                    json={"prompt": "a lighthouse", "size": "512x512", "num_inference_steps": 1, "seed": 2})
    assert ok.status_code == 200, ok.text
    wrong = httpx.get(f"{serve_run.url}/v1/images/generations", headers={"X-Request-ID": "first-hour-405"})
    assert wrong.status_code == 405
    for request_id, expected in (("first-hour-ok", "access method=POST route=/v1/images/generations key=anonymous status=200 "),
                                 ("first-hour-405", "access method=GET route=/v1/images/generations key=anonymous status=405 ")):
        lines = serve_run.lines_of(request_id)
        assert len(lines) == 1 and expected in lines[0], "\n".join(lines)
    started = serve_run.output()
    for noise in ("Loading weights", "Writing model shards", "it/s]", "Silenced known harmless", "cuda_graphs=",
                  "compiled=False"):
        assert noise not in started, noise


def test_the_start_budget_reads_this_start(serve_run):
    """benchmarks/start_budget.py (bench_first_run's tables) on this start's own output: every milestone
    of the application in time order, and each stage's replica from its request to its ready."""
    result = budget(list(zip(serve_run.arrivals, serve_run.lines)))
    timed = [row for row in result["app"] if row["at_s"] is not None]
    assert {row["step"] for row in timed} == {
        "CLI started", "application imported and built", "Ray started", "Serve controller started",
        "replicas requested", "last replica ready", "application ready"}, serve_run.output()[-3000:]
    assert [row["step"] for row in timed][:5] == [  # `serve run`'s own order: build, then Ray, Serve, deploy
        "CLI started", "application imported and built", "Ray started", "Serve controller started", "replicas requested"]
    assert sum(row["took_s"] for row in timed) == pytest.approx(timed[-1]["at_s"], abs=0.5)
    assert result["app"][-1]["step"] == "of which build_app" and 0 < result["app"][-1]["took_s"] < timed[1]["took_s"]
    assert set(result["replicas"]) == {"PromptStyler", "TextEncoder", "Denoiser", "VaeDecoder"}
    for stage in ("TextEncoder", "Denoiser", "VaeDecoder"):
        row = result["replicas"][stage]
        assert row["imports_s"] > 0 and row["process_to_constructor_s"] >= 0, row  # the model code: in the replica
        slack = 0.1 * 2  # each figure is rounded to 0.1 s on its own: a sum may pass its rounded total by that
        assert row["request_to_ready_s"] + slack >= row["constructor_to_ready_s"] >= row["imports_s"] + row["load_s"] - slack, row
    assert result["replicas"]["PromptStyler"]["imports_s"] == 0.0  # no model code to import
    table = format_budget(result)
    assert "| application imported and built |" in table and "| Denoiser |" in table


def test_sigterm_stops_it_as_ctrl_c_does(serve_run):
    assert serve_run.ray_processes(), "no Ray process of this instance found before the signal"
    before = len(serve_run.lines)
    serve_run.process.send_signal(signal.SIGTERM)  # to the command alone, as a supervisor sends it
    assert serve_run.process.wait(timeout=120) == 0, serve_run.output()[-4000:]
    time.sleep(1)  # the reader has the last lines
    after = "".join(serve_run.lines[before:])
    assert "SIGTERM received" not in after and "Traceback" not in after, after[-4000:]
    assert "shutting down" in after, after[-4000:]
    deadline = time.monotonic() + 30
    while serve_run.ray_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert not serve_run.ray_processes(), serve_run.ray_processes()
