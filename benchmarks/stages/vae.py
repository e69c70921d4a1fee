"""VAE decode: plain `vae.decode` (tiled too above 1024x1024) against ours channels-last, then compiled
as the VaeDecoder runs it."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from benchmarks.harness import Bench
import deployments.vae.compile as vae_compile
from deployments.geometry import latent_shape


def _vae_inputs(bench: Bench, vae: Any) -> tuple[Any, dict[int, torch.Tensor]]:
    from deployments.vae.codec import VaeCodec

    codec = VaeCodec(vae, bench.device, bench.dtype, tile_px=bench.args.vae_tile_px,
                     tile_overlap=bench.args.vae_tile_overlap)
    latents = {}
    for size in bench.args.sizes:
        g = torch.Generator("cpu").manual_seed(size)
        z = torch.randn(latent_shape(vae.config.latent_channels, size, size), generator=g)
        latents[size] = (z / codec.scaling_factor + codec.shift_factor).to(bench.device, bench.dtype)
    return codec, latents


def _vae_ours(vae: Any, codec: Any, size: int, z: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return (vae.tiled_decode(z) if codec.needs_tiling(size, size) else vae.decode(z)).sample


def section_vae(bench: Bench, vae: Any) -> None:
    """Plain `vae.decode` (untiled, as the pipeline; tiled too above 1024x1024), then ours channels-last."""
    codec, latents = _vae_inputs(bench, vae)
    for size, z in latents.items():
        try:
            with torch.inference_mode():
                timing = bench.measure(lambda z=z: vae.decode(z).sample)
            bench.row("vae_decode", size, "plain", timing)
        except torch.OutOfMemoryError:
            bench.note(f"plain VAE decode at {size} ran out of memory")
            bench.free()
        if codec.needs_tiling(size, size):
            with torch.inference_mode():
                timing = bench.measure(lambda z=z: vae.tiled_decode(z).sample)
            bench.row("vae_decode", size, "plain_tiled", timing)
        bench.write()

    for size, z in latents.items():
        timing = bench.measure(lambda s=size, z=z: _vae_ours(vae, codec, s, z))
        bench.row("vae_decode", size, "ours", timing, tiled=codec.needs_tiling(size, size))
        bench.write()


def section_vae_compiled(bench: Bench, vae: Any) -> None:
    """Last, as it may compile for a minute or more. As the VaeDecoder runs it: static graphs for the
    sizes up to 1024x1024 (its warm-up sizes), the dynamic graph for larger (tiled) sizes."""
    if bench.args.skip_compile:
        return
    codec, latents = _vae_inputs(bench, vae)
    vae_compile.optimize_vae(vae, compile=True, channels_last=bench.args.vae_channels_last, backend=bench.backend)
    decoder = vae.decoder.forward
    firsts = {}
    for size, z in latents.items():
        recording = decoder.recording_static() if size <= 1024 else contextlib.nullcontext()
        with recording:
            firsts[size] = bench.first_call_s(lambda s=size, z=z: _vae_ours(vae, codec, s, z))
        bench.results["compile"]["vae"] = {"per_size_first_call_s": firsts}
        bench.write()
    print(f"  compile vae: {firsts}", flush=True)
    for size, z in latents.items():
        timing = bench.measure(lambda s=size, z=z: _vae_ours(vae, codec, s, z))
        bench.row("vae_decode", size, "ours_compiled", timing, tiled=codec.needs_tiling(size, size),
                  graph="static" if size <= 1024 else "dynamic")
        bench.write()
