"""More than one node: a two-node Ray cluster on this machine, stages pinned to different nodes with
custom resources through the app's args, serves requests with the pixels of the local pipeline (what
the one-node app is held to in the other modules), LoRA adapters included: one from the shared
adapter directory and one from a hub alias, which the Denoiser on the second node resolves from its
own hub cache (offline, `HF_HUB_OFFLINE=1`, pre-populated)."""

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

from deployments.denoiser.lora.library import LoraLibrary, LoraSettings
from deployments.local_pipeline import GenerationSpec
from deployments.denoiser.lora.random_adapters import diffusers_state, kohya_state, random_factors, write
from tests.lora_files import hub_cache

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BASE = {"prompt": "a lighthouse on two nodes", "size": "512x512", "num_inference_steps": 3, "seed": 31}
LORAS = [{"name": "ink", "scale": 0.8}, {"name": "wash", "scale": -0.6}]
REQUESTS = [BASE, {**BASE, "loras": LORAS}, {**BASE, "loras": [{"name": "absent"}]}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, pipeline):
    """`wash` in the adapter directory (every node mounts it), `ink` only in a hub cache (the alias
    `studio/ink-lora:ink.safetensors`), `absent` an alias whose file is nowhere."""
    root = tmp_path_factory.mktemp("two-node-loras")
    transformer = pipeline.loop.transformer
    ink = kohya_state(random_factors(transformer, rank=8, seed=21), alpha=4.0)
    wash = diffusers_state(random_factors(transformer, rank=4, seed=22))
    write(root / "dir", "wash", wash)
    hub_cache(root / "hub", "studio/ink-lora", "ink.safetensors", ink)
    write(root / "reference", "ink", ink)
    write(root / "reference", "wash", wash)
    args = {"lora_dir": str(root / "dir"), "lora_hub_cache_dir": str(root / "hub"),
            "lora_hub": {"ink": "studio/ink-lora:ink.safetensors", "absent": "studio/absent:a.safetensors"}}
    return root, args


@pytest.fixture(scope="module")
def served_on_two_nodes(cache_dir, adapters) -> dict:
    # Ray's temporary folder of its own: the Cluster helper writes (and on shutdown deletes) the
    # "current cluster" address file there, which `ray` and `serve` commands would otherwise read. Short,
    # as Ray's socket paths live under it.
    ray_tmp = tempfile.mkdtemp(prefix="zr", dir="/tmp")
    env = {**os.environ, "ZIMAGE_CACHE_DIR": str(cache_dir), "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp,
           "HF_HUB_OFFLINE": "1"}
    spec = {"requests": REQUESTS, "args": adapters[1]}
    try:
        out = subprocess.run(
            [sys.executable, str(ROOT / "tests/integration/two_node_app.py"), str(cache_dir), json.dumps(spec)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=480,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-4000:] + out.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["nodes"] == {"ingress": "a", "prompt_styler": "a", "text_encoder": "a", "denoiser": "b", "vae": "b"}
    return result


def pixels(response: dict) -> np.ndarray:
    assert response["status"] == 200, response
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response["b64_json"]))).convert("RGB")).astype(np.int16)


def local_pixels(pipeline, loras=()) -> np.ndarray:
    spec = GenerationSpec(BASE["prompt"], 512, 512, steps=BASE["num_inference_steps"], seed=BASE["seed"], loras=loras)
    return pipeline.generate([spec])[0].pixels.numpy().astype(np.int16)


def test_stages_on_two_nodes_give_the_pixels_of_one(served_on_two_nodes, pipeline):
    two = pixels(served_on_two_nodes["responses"][0])
    assert two.shape == (512, 512, 3) and np.abs(two - local_pixels(pipeline)).max() <= 1


def test_a_denoiser_on_the_second_node_applies_directory_and_hub_adapters(served_on_two_nodes, adapters, pipeline):
    two = pixels(served_on_two_nodes["responses"][1])
    assert np.abs(two - pixels(served_on_two_nodes["responses"][0])).max() > 20  # the adapters changed it
    library = LoraLibrary(LoraSettings(lora_dir=str(adapters[0] / "reference")))
    slots = pipeline.loop.lora_slots
    laid = tuple((slots.lay_out(library.load(item["name"])[0]), item["scale"]) for item in LORAS)
    assert np.abs(two - local_pixels(pipeline, laid)).max() <= 1


def test_the_listing_shows_directory_files_and_hub_aliases(served_on_two_nodes, adapters):
    listed = {entry["name"]: entry for entry in served_on_two_nodes["loras"]}
    assert set(listed) == {"wash", "ink", "absent"}
    assert (listed["wash"]["source"], listed["wash"]["rank"]) == ("directory", 4)
    # the Ingress reads a hub file's header from its node's cache; it downloads nothing
    assert (listed["ink"]["source"], listed["ink"]["rank"], listed["ink"].get("fetched", True)) == ("hub", 8, True)
    assert listed["ink"]["bytes"] == (adapters[0] / "reference" / "ink.safetensors").stat().st_size
    assert (listed["absent"]["fetched"], listed["absent"]["rank"], listed["absent"]["bytes"]) == (False, 0, 0)


def test_a_hub_alias_whose_file_cannot_be_fetched_is_a_503_on_the_second_node(served_on_two_nodes):
    response = served_on_two_nodes["responses"][2]
    assert response["status"] == 503, response
    error = response["error"]
    assert (error["param"], error["code"]) == ("loras", "lora_unavailable") and "'absent'" in error["message"]
