"""The VAE decoder compiles nothing on a request: tiles (views of the whole latents) reuse the graphs
warmed at start-up, and the warm-up's tile ladder reaches every edge-tile size a tiled decode cuts."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

import deployments.vae.compile as vae_compile
from deployments.weights import loading

CPU, F32 = torch.device("cpu"), torch.float32


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_tile_views_reuse_the_warmed_graphs(tiny_source):
    """Dynamo guards on strides; a tile is a view whose strides depend on the image's size. Without a
    contiguous copy each new image size recompiled (measured on the tiny VAE: 1536x1536, 1920x1088 and
    2048x2048 each compiled on their first request), and a tile shaped like a static size missed it."""
    vae = loading.load_vae(tiny_source, CPU, F32)
    vae_compile.optimize_vae(vae, compile=True, channels_last=False, backend="eager")
    decoder = vae.decoder.forward
    g = torch.Generator("cpu").manual_seed(0)
    with torch.inference_mode():
        with decoder.recording_static():
            vae.decoder(torch.randn(1, 16, 8, 8, generator=g))
        vae.decoder(torch.randn(1, 16, 6, 10, generator=g))  # the dynamic graph's warm-up
        warmed = graphs()
        for side in (20, 24):  # two "images" of different sizes, cut into tiles
            whole = torch.randn(1, 16, side, side, generator=g)
            for tile in (whole[:, :, :8, :8], whole[:, :, 8:14, :10], whole[:, :, :10, 10:16]):
                assert not tile.is_contiguous()
                plain = type(vae.decoder).forward(vae.decoder, tile)
                assert torch.allclose(vae.decoder(tile), plain, atol=1e-5)
    assert graphs() == warmed


def test_the_tile_ladder_spans_every_edge_tile_size():
    shapes = vae_compile.dynamic_warmup_shapes(160)
    sides = {h for h, _ in shapes}
    assert min(sides) == 2 and max(sides) == 160  # a 1040x1040 image's corner tile is 2x2 latent cells
    assert all((w, h) in shapes for h, w in shapes)  # both orientations
    areas = sorted({h * w for h, w in shapes})
    assert all(b / a <= 4 for a, b in zip(areas, areas[1:]))  # no size class is skipped by much


def test_the_size_warm_up_decodes_previews_and_encodes_each_size_once(tiny_source):
    """`vae.size_warmup`: every size previewed and encoded, decoded unless a static graph holds it,
    smallest first; the steps run through the codec the replica serves with (tiny, on the CPU)."""
    from deployments.vae.codec import VaeCodec
    from deployments.vae.size_warmup import size_steps

    codec = VaeCodec(loading.load_vae(tiny_source, CPU, F32), CPU, F32, tile_above_px=64 * 64, tile_px=64)
    calls = []
    codec.decode = lambda items, real=codec.decode: calls.append(("decode", items[0].width)) or real(items)
    codec.encode = lambda images, real=codec.encode: calls.append(("encode", images[0].width)) or real(images)
    steps = size_steps(codec, [(96, 64), (64, 48), (48, 48)], static_sizes=[(48, 48)])
    assert [key for key, _ in steps] == [
        "preview/48x48", "encode/48x48",
        "decode/64x48", "preview/64x48", "encode/64x48",
        "decode/96x64", "preview/96x64", "encode/96x64",  # over tile_above_px: the tiled decode
    ]
    for _, step in steps:
        step()
    assert calls == [("encode", 48), ("decode", 64), ("encode", 64), ("decode", 96), ("encode", 96)]
