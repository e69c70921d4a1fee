"""A replica's start on the GPU: `auto` resolves on the device itself, and the VaeDecoder reports ready
after its static graphs, compiling its dynamic graph after ready without compiling on a request.

    pytest -m gpu tests/gpu/test_gpu_start.py -s     # one H200; prints the VaeDecoder's start phases
"""

from __future__ import annotations

import pytest
import torch
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
