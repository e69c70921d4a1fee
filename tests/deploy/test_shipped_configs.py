"""The shipped serve_config.yaml and cluster.yaml cannot rot: each is checked as it is in the repo."""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cluster_yaml_matches_the_schema_shipped_with_ray():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["worker_h200"]["resources"]["GPU"] == 8
    assert any("pip install -e" in cmd for cmd in config["setup_commands"])


def test_serve_config_validates_against_serves_own_schema_without_a_warning():
    """No FutureWarning from Ray Serve (a look-back not above metrics_interval_s warns now and will be
    refused later), and Ray's per-request lines off for the proxies and the application's replicas."""
    from ray.serve.schema import ServeDeploySchema

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    assert config.logging_config.enable_access_log is False
    assert config.applications[0].logging_config.enable_access_log is False


def test_serve_config_args_validate_and_gpu_shares_fit_one_h200():
    from deployments.speed import SPEED_FIELDS
    from serve_app.config import AppArgs

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    args = AppArgs.from_args(app["args"])
    assert args.model == "Tongyi-MAI/Z-Image-Turbo"
    from deployments.speed import Hardware, resolve_speed

    # The speed settings are the defaults (`auto`): on an H200 they resolve to the fused FP8 path.
    assert {name: getattr(args, name) for name in SPEED_FIELDS} == dict.fromkeys(SPEED_FIELDS, "auto")
    h200 = Hardware("cuda", "NVIDIA H200", (9, 0), triton=True, cudnn_frontend=True)
    speed = resolve_speed(h200, **{name: getattr(args, name) for name in SPEED_FIELDS})
    assert {k: c.value for k, c in speed.choices().items()} == {
        "dtype": "bf16", "precision": "fp8", "fp8_kernels": "fused", "compile": True, "dit_cuda_graphs": True,
        "text_encoder_compile": True, "vae_compile": True}
    assert args.warmup_pixels() == [(512, 512), (1024, 1024)]
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"Ingress", "PromptStyler", "TextEncoder", "Denoiser", "VaeDecoder"}
    fractions = [deployments[name]["ray_actor_options"]["num_gpus"] for name in ("TextEncoder", "Denoiser", "VaeDecoder")]
    assert all(f > 0 for f in fractions) and sum(fractions) <= 1  # placement: tests/deploy/test_placement.py
    for deployment in deployments.values():
        assert "autoscaling_config" in deployment, deployment["name"]


def test_each_stage_declares_its_own_defaults_and_gets_no_gpu_without_one():
    """The builder lays `args` over what each stage declares next to its code; with no GPU in use
    every stage gets 0 GPUs, and every stage is bound to a complete live config."""
    from deployments.denoiser.deployment import Denoiser
    from serve_app.builder import stage_options
    from serve_app.config import AppArgs

    assert Denoiser.ray_actor_options["num_gpus"] > 0
    cpu = AppArgs.from_args({"device": "cpu", "denoiser.ray_actor_options.num_cpus": 3,
                             "denoiser.user_config.max_batch_size": 2})
    options, live = stage_options(Denoiser, cpu, "denoiser")
    assert options["ray_actor_options"] == {"num_cpus": 3, "num_gpus": 0}
    assert live == options["user_config"] == {"max_batch_size": 2, "batch_wait_timeout_s": 0.0,
                                            "max_model_call_s": 300.0, "scheduling": "continuous",
                                            "lora_cache_bytes": 8 << 30}
    gpu = AppArgs.from_args({"device": "cuda"})
    assert stage_options(Denoiser, gpu, "denoiser")[0]["ray_actor_options"]["num_gpus"] == Denoiser.ray_actor_options["num_gpus"]


@pytest.mark.integration
def test_serve_config_runs_with_serve_run(tmp_path, cache_dir):
    """This very file, with only model and device changed, served by the README's production command
    (`python -m serve_app.serve_run`: Ray's `serve run`, stopping cleanly on SIGTERM) in a subprocess."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    changed = copy.deepcopy(config)
    changed["applications"][0]["args"].update(model="tiny", device="cpu")
    port = free_port()
    changed["http_options"].update(host="127.0.0.1", port=port)  # where the test can reach it
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(changed))
    ray_tmp = tempfile.mkdtemp(prefix="zr", dir="/tmp")  # short: Ray's socket paths live under it
    env = {
        **os.environ,
        "ZIMAGE_CACHE_DIR": str(cache_dir),
        "RAY_ADDRESS": "local",  # a cluster of its own, apart from any other test's or a running server's
        "RAY_TMPDIR": ray_tmp,  # and its own session folder: /tmp/ray/session_latest stays the server's
        # The file reserves CPUs and GPU shares sized for an H200 node, and Serve applies a file's
        # ray_actor_options after the builder: let this machine advertise them as Ray's logical
        # resources. Placement only: the replicas see no CUDA device and run on the CPU (device=cpu).
        "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 16, "GPU": 1}),
        "PYTHONUNBUFFERED": "1",
    }
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "serve_app.serve_run", str(path)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("serve run never became ready:\n" + (tmp_path / "serve.log").read_text()[-4000:])
        body = {"prompt": "a lighthouse", "size": "512x512", "num_inference_steps": 2, "seed": 1}
        # one line for a request in the command's output, the Ingress's access line (the file's logging_config
        # turns Ray's off), on the first request too (the Ingress starts its handles' routers as it starts)
        response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120,
                              headers={"X-Request-ID": "shipped-config-request"})
        assert response.status_code == 200, response.text
        assert base64.b64decode(response.json()["data"][0]["b64_json"]).startswith(b"\x89PNG")
        lines = lines_of_request((tmp_path / "serve.log"), "shipped-config-request")
        assert len(lines) == 1 and "access method=POST route=/v1/images/generations key=anonymous status=200" \
            in lines[0], "\n".join(lines)
        # Stopped as a supervisor stops it: SIGTERM to the command alone. Plain `serve run` with a config
        # file would print Ray's native stack dump and exit with status 15 (serve_app/serve_run.py).
        before = len((tmp_path / "serve.log").read_text())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-4000:]
        output = (tmp_path / "serve.log").read_text()[before:]
        assert "received at time=" not in output and "Traceback" not in output, output[-4000:]  # no stack dump
        assert "shutting down" in output, output[-4000:]  # serve run's Ctrl-C path: Serve shut down
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of its process group is left
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def lines_of_request(log: Path, request_id: str, settle_s: float = 3.0) -> list[str]:
    """The log's lines that carry `request_id`, once its access line is there and `settle_s` more have
    passed (Ray forwards each replica's lines on its own schedule)."""
    deadline = time.monotonic() + 60
    while " access " not in "".join(line for line in log.read_text().splitlines() if request_id in line):
        assert time.monotonic() < deadline, f"no access line for {request_id}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    time.sleep(settle_s)
    return [line for line in log.read_text().splitlines() if request_id in line]


def test_protocol_imports_with_pydantic_alone():
    """A client builds an ImageRequest without the server installed: no ray, torch or diffusers."""
    code = ("import sys, serve_app.protocol as p; p.ImageRequest(prompt='x');"
            "print(','.join(m for m in ('ray', 'torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
