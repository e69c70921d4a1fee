"""More than one node: a two-node Ray cluster on this machine, stages pinned to different nodes with
custom resources through the app's args, serves a request with the same pixels as one node."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_stages_on_two_nodes_give_the_pixels_of_one(cache_dir):
    request = {"prompt": "a lighthouse on two nodes", "size": "512x512", "num_inference_steps": 3, "seed": 31}
    # Ray's temporary folder of its own: the Cluster helper writes (and on shutdown deletes) the
    # "current cluster" address file there, which `ray` and `serve` commands would otherwise read. Short,
    # as Ray's socket paths live under it.
    ray_tmp = tempfile.mkdtemp(prefix="zr", dir="/tmp")
    env = {**os.environ, "ZIMAGE_CACHE_DIR": str(cache_dir), "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp}
    try:
        out = subprocess.run(
            [sys.executable, str(ROOT / "tests/integration/two_node_app.py"), str(cache_dir), json.dumps(request)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=420,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-4000:] + out.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["one_node"]["nodes"] == dict.fromkeys(("ingress", "prompt_styler", "text_encoder", "denoiser", "vae"), "a")
    assert result["two_nodes"]["nodes"] == {"ingress": "a", "prompt_styler": "a", "text_encoder": "a",
                                            "denoiser": "b", "vae": "b"}
    one, two = (np.asarray(Image.open(io.BytesIO(base64.b64decode(result[k]["b64_json"])))) for k in ("one_node", "two_nodes"))
    assert one.shape == (512, 512, 3) and np.array_equal(one, two)
