"""A replica's start on the GPU: `auto` resolves on the device itself, the VaeDecoder reports ready
after its static graphs, compiling its dynamic graph after ready without compiling on a request, and a
stage started from a compile cache that `zimage-serve-cache build` filled on this machine, on a node
whose own caches are empty (fresh inductor and Triton directories), compiles nothing with inductor:
FX-graph cache hits only, through every warm-up; dynamo still traces, and its seconds are recorded
(`compile_dynamo_s`).

    pytest -m gpu tests/gpu/test_gpu_start.py -s     # one GPU; prints each start's phases and compile counts
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch._dynamo.utils import counters

from deployments.contracts import Latents
from deployments.geometry import latent_shape
from deployments.speed import Hardware, resolve_speed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_auto_resolves_on_this_gpu_to_its_fastest_path():
    hardware = Hardware.probe(torch.device("cuda"))
    speed = resolve_speed(hardware)
    print(speed.describe())
    assert speed.compile.value and speed.dit_cuda_graphs.value and speed.vae_compile.value
    if hardware.capability == (9, 0):
        assert speed.precision.value == "fp8"
        assert speed.fp8_kernels.value == ("fused" if hardware.cudnn_frontend else "fused-bf16-attention")


def test_the_vae_is_ready_before_its_dynamic_graph_and_never_compiles_on_a_request(tmp_path):
    from deployments.vae.deployment import VaeDecoder

    settings = {"model": "random", "device": "cuda", "cache_dir": str(tmp_path), "vae_tile_px": 1280,
                "vae_tile_overlap": 0.2}
    vae = VaeDecoder.func_or_class(settings)
    stats = vae.stats()
    print("VaeDecoder start phases:", stats["start_phases"], "after ready:", stats["warm_after_ready"]["calls"])
    assert stats["speed"]["vae_compile"]["value"] is True and stats["start_phases"]["random_init_s"] > 0
    assert stats["warm_after_ready"]["calls"] > 0

    def decode(width: int, height: int) -> tuple[torch.Tensor, int]:
        """The pixels, and the graphs compiled during this decode alone: counted inside the GPU lane,
        which the background warm-up's calls take turns on, so their compiles are not counted."""
        z = torch.randn(latent_shape(16, width, height), generator=torch.Generator().manual_seed(0))

        def counted():
            before = counters["stats"]["unique_graphs"]
            pixels = vae.codec.decode([Latents(z, width, height)])[0].pixels
            return pixels, counters["stats"]["unique_graphs"] - before

        return vae.gpu_lane.run_blocking(counted)

    if not vae.after_ready.ready.is_set():  # a size with no static graph, before the dynamic one is warm
        early, compiled = decode(1536, 640)
        assert compiled == 0, "a request compiled before the dynamic graph was warm"
    assert vae.after_ready.wait(900), vae.after_ready.as_dict()
    print("after ready:", vae.stats()["warm_after_ready"])
    late, compiled = decode(1536, 640)
    assert compiled == 0, "a request compiled after the warm-up"
    for size in ((1024, 1024), (512, 512), (2048, 2048), (1344, 768)):
        assert decode(*size)[1] == 0, f"a request at {size} compiled after the warm-up"
    if "early" in locals():  # eager against compiled: within bf16 noise (uint8 pixels)
        assert (early.int() - late.int()).abs().float().mean() < 1.0


ROOT = Path(__file__).resolve().parents[2]
STAGES = ("TextEncoder", "Denoiser", "VaeDecoder")
# One warm-up size keeps the builds short; every graph a start compiles is still in the file.
ARGS = {"model": "random", "device": "cuda", "warmup_sizes": ["512x512"]}

START = """
import json, sys
from serve_app.cache_build import STAGES
name, settings, base_config = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
module = STAGES[name][1]
stage = getattr(__import__(module, fromlist=[name]), name).func_or_class(settings, base_config)
at_ready = stage.stats()["compile"]
warm = [stage.after_ready.wait(900)] + [w.wait(900) for w in (getattr(stage, "shape_warmup", None),) if w]
stats = stage.stats()
print("RESULT " + json.dumps({"warm": all(warm), "at_ready": at_ready, "compile": stats["compile"],
                              "start_phases": stats["start_phases"], "compile_cache": stats["compile_cache"]}))
"""


def build(root: Path, stage: str) -> tuple[dict, dict]:
    """`zimage-serve-cache build --stages <stage>` on serve_config.yaml (model random, one warm-up
    size), its files in a directory that later starts share: (the stage's replica inputs from that
    config, the build's report)."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["applications"][0]["args"].update(ARGS, cache_dir=str(root / "build-node"),
                                             compile_cache={"directory": str(root / "shared")})
    (root / "serve_config.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "serve_app.cache_build", "build", "--config",
                           str(root / "serve_config.yaml"), "--stages", stage, "--json", str(root / "build.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    from serve_app.cache_build import application, stage_inputs

    inputs = stage_inputs(application(str(root / "serve_config.yaml"), None))[stage]
    (report,) = json.loads((root / "build.json").read_text())
    return inputs, report


@pytest.mark.parametrize("stage", STAGES)
def test_a_start_from_a_filled_cache_compiles_nothing_with_inductor(tmp_path, stage):
    """One stage: its build, then its start on a new node (`-k Denoiser` runs one, a few minutes)."""
    inputs, build_report = build(tmp_path, stage)
    assert build_report["compile"]["fx_misses"] + build_report["compile"]["fx_hits"] > 0, build_report
    settings = {**inputs["settings"], "cache_dir": str(tmp_path / "new-node")}  # empty inductor and Triton caches
    done = subprocess.run([sys.executable, "-c", START, stage, json.dumps(settings), json.dumps(inputs["base_config"])],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    phases, counts = result["start_phases"], result["compile"]
    print(f"{stage} from the cache: start phases {phases}; compile at ready {result['at_ready']}, "
          f"after every warm-up {counts}; the build's start phases {build_report['start_phases']}")
    assert result["warm"]
    (file,) = result["compile_cache"].values()
    assert file["loaded_from"] == str(tmp_path / "shared"), file
    assert counts["fx_hits"] > 0 and counts["fx_misses"] == 0 and counts["aot_misses"] == 0, counts
    assert phases["compile_dynamo_s"] > 0 and phases["compile_s"] >= phases["compile_dynamo_s"], phases
