"""`zimage-serve-cache` on the shipped config: each model stage started as its replica would be (the
file's live config over the args'), in a process of its own. A CPU compiles nothing, so the build
says there is nothing to cache (exit status 2); the GPU test suite builds a real one
(tests/gpu/test_gpu_start.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.deploy.test_shipped_configs import ROOT


def shipped_config_on_cpu(tmp_path, shared) -> str:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["applications"][0]["args"].update(model="tiny", device="cpu", cache_dir=str(tmp_path / "node"),
                                             compile_cache={"directory": str(shared)})
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def cache_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve_app.cache_build", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_build_starts_each_stage_with_its_live_config_and_says_a_cpu_has_nothing_to_cache(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "vae-0123456789abcdef0123.bin").write_bytes(b"\0" * 2048)
    config = shipped_config_on_cpu(tmp_path, shared)
    done = cache_command("build", "--config", config, "--stages", "VaeDecoder", "--json", str(tmp_path / "out.json"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "VaeDecoder   float32, eager on cpu: ready" in done.stdout and "nothing was compiled" in done.stdout
    (report,) = json.loads((tmp_path / "out.json").read_text())
    assert report["warm"] and report["files"] == {} and report["compile"]["frames"] == 0
    shipped = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["deployments"]
    assert report["config"]["max_batch_size"] == next(d for d in shipped if d["name"] == "VaeDecoder")[
        "user_config"]["max_batch_size"]  # the file's user_config reached the stage

    listed = cache_command("list", "--config", config)
    assert listed.returncode == 0, listed.stderr
    assert f"{shared}: 1 files\n  vae-0123456789abcdef0123.bin  0.0 MiB" in listed.stdout
    assert f"{tmp_path / 'node' / 'compile' / 'mega'}: 0 files" in listed.stdout
