"""Building the application imports no model code, and the Ingress imports its model-side modules
before it is ready, never on a request.

`serve deploy` builds the application in Serve's controller and `serve run` in its own process,
neither of which runs a model: the builder (and everything it imports) must not load torch,
diffusers or transformers, which only the replicas need. Checked in a fresh interpreter, since this
test process has imported them all.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.deploy.test_shipped_configs import ROOT

MODEL_PACKAGES = ("torch", "diffusers", "transformers", "torchao", "triton", "safetensors", "accelerate")

SCRIPT = r"""
import io, json, sys
from pathlib import Path

import yaml

MODEL_PACKAGES = %r
out = {}

def loaded_model_packages():
    return sorted(name for name in MODEL_PACKAGES if name in sys.modules)

from serve_app.builder import build_app
out["import"] = loaded_model_packages()
args = yaml.safe_load(Path("serve_config.yaml").read_text())["applications"][0]["args"]
app = build_app(args)
out["build"] = loaded_model_packages()
out["bound"] = [app._bound_deployment.name, len(app._bound_deployment.init_args)]  # the build really ran

import deployments.style.deployment  # PromptStyler's replica: a CPU stage with no model
out["styler"] = loaded_model_packages()

# The Ingress's replica: what its constructor imports, then one call of each lazily importing path.
from PIL import Image
from serve_app.replica_imports import import_request_path
import_request_path()
buffer = io.BytesIO()
Image.new("LA", (64, 64), (0, 0)).save(buffer, format="PNG")
mask_png = buffer.getvalue()
before = set(sys.modules)

import torch
from serve_app import backlog, control, image_io, loras, masks, pipeline
from deployments.contracts import DenoiseRequest, LoraRef

backlog.plan_work(1, 512, 512, 8, 0.6, edit=True)
image_io.encode_output(torch.zeros((16, 16, 3), dtype=torch.uint8), "jpeg", None)
mask = masks.decode_mask(mask_png, (64, 64), 1 << 20, 1 << 20)
masks.plan_mask(mask, 64, 64)
control.plan_control(Image.new("RGB", (64, 64)), None, None, (64, 64))
loras.LoraCatalog({})

class Handle:
    def options(self, **kwargs):
        return kwargs

images = pipeline.ImagePipeline(None, None, Handle(), None)
request = DenoiseRequest(width=64, height=64, steps=2, seed=0, loras=(LoraRef("a", 1.0),))
out["multiplexed"] = images._denoiser_for(request)["multiplexed_model_id"]
new = set(sys.modules) - before
# ours, or a package that costs seconds (imagecodecs loads its small codec extensions on first use)
out["request_path"] = sorted(name for name in new if name.split(".")[0] in ("deployments", "serve_app")
                             or name in ("imagecodecs",) + MODEL_PACKAGES)
print("RESULT " + json.dumps(out))
""" % (MODEL_PACKAGES,)


def run_fresh() -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_the_builder_and_the_ingress_import_model_code_only_where_they_must():
    out = run_fresh()
    assert out["bound"] == ["Ingress", 4]  # bound to the four stages
    assert out["import"] == [], f"importing serve_app.builder loaded {out['import']}"
    assert out["build"] == [], f"building serve_config.yaml's application loaded {out['build']}"
    assert out["styler"] == [], f"PromptStyler's module loaded {out['styler']}"
    assert out["multiplexed"]
    assert out["request_path"] == [], (
        f"an Ingress request imported {out['request_path']}: add them to serve_app.replica_imports.REQUEST_PATH")
