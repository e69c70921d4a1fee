"""The README's quick start as a user runs it: `serve run serve_app:build_app` in a process of its
own (its own Ray instance, temporary folder and HTTP port). Ready is answered the moment the command
says the application is ready, and SIGTERM stops it as Ctrl-C does: exit status 0, Serve shut down,
no stack dump, none of its Ray processes left. The production form, a config file through
`serve_app.serve_run`, stops on SIGTERM the same way."""

from __future__ import annotations

import contextlib
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
import yaml

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
    lines: list[str] = field(default_factory=list)
    ready_seen: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if READY_LINE in line:
                self.ready_seen.set()

    def output(self) -> str:
        return "".join(self.lines)

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


@contextlib.contextmanager
def started(command: list[str], port: int, cache_dir, ready) -> Iterator[ServeRun]:
    """`command` in a process of its own with its own Ray instance, once `ready(run)` says so."""
    ray_tmp = tempfile.mkdtemp(prefix="zr", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "ZIMAGE_CACHE_DIR": str(cache_dir), "RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp,
           "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    run = ServeRun(process, f"http://127.0.0.1:{port}", ray_tmp)
    threading.Thread(target=run.read, daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready(run):
            if process.poll() is not None or time.monotonic() > deadline:
                time.sleep(1)  # the reader has the last lines
                pytest.fail(f"not ready (exit status {process.poll()}):\n{run.output()[-4000:]}")
        yield run
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def serve_run(cache_dir) -> Iterator[ServeRun]:
    """The README's quick start: `serve run serve_app:build_app`, ready when it prints so."""
    port = free_port()
    command = [sys.executable, str(ROOT / "tests/deploy/serve_run_on_port.py"), str(port), "serve_app:build_app"]
    with started(command, port, cache_dir, lambda run: run.ready_seen.wait(1)) as run:
        yield run


def sigterm_stops_it_as_ctrl_c_does(run: ServeRun) -> None:
    assert run.ray_processes(), "no Ray process of this instance found before the signal"
    before = len(run.lines)
    run.process.send_signal(signal.SIGTERM)  # to the command alone, as a supervisor sends it
    assert run.process.wait(timeout=120) == 0, run.output()[-4000:]
    time.sleep(1)  # the reader has the last lines
    after = "".join(run.lines[before:])
    assert "SIGTERM received" not in after and "Traceback" not in after, after[-4000:]
    assert "shutting down" in after, after[-4000:]
    deadline = time.monotonic() + 30
    while run.ray_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert not run.ray_processes(), run.ray_processes()


def test_ready_is_answered_when_the_command_says_ready(serve_run):
    response = httpx.get(f"{serve_run.url}/health/ready", timeout=10)  # right after the line
    assert response.status_code == 200, (response.text, serve_run.output()[-2000:])
    assert response.json()["stages"] == dict.fromkeys(["PromptStyler", "TextEncoder", "Denoiser", "VaeDecoder"], True)
    body = {"prompt": "a lighthouse", "size": "512x512", "num_inference_steps": 2, "seed": 1}
    assert httpx.post(f"{serve_run.url}/v1/images/generations", json=body, timeout=300).status_code == 200


def test_sigterm_stops_it_as_ctrl_c_does(serve_run):
    sigterm_stops_it_as_ctrl_c_does(serve_run)


def answers_ready(run: ServeRun) -> bool:
    time.sleep(1)
    try:
        return httpx.get(f"{run.url}/health/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_config_file_form_stops_on_sigterm_too(cache_dir, tmp_path):
    """The README's production command, `python -m serve_app.serve_run serve_config.yaml`, on a config
    file of the same shape for the tiny model: it serves, and SIGTERM stops it as Ctrl-C does (`serve
    run` with a config file alone keeps Ray's handler and its stack dump: serve_app/serve_run.py)."""
    port = free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    app["args"] = {"model": "tiny", "device": "cpu", "cache_dir": str(cache_dir)}
    app["deployments"] = []  # the production file's GPU shares and replica counts: not on this machine
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    with started([sys.executable, "-m", "serve_app.serve_run", str(path)], port, cache_dir, answers_ready) as run:
        assert "Running config file" in run.output(), run.output()[-4000:]
        body = {"prompt": "a lighthouse", "size": "512x512", "num_inference_steps": 1, "seed": 1}
        assert httpx.post(f"{run.url}/v1/images/generations", json=body, timeout=300).status_code == 200
        sigterm_stops_it_as_ctrl_c_does(run)
