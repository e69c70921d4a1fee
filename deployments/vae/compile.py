"""The VAE's compiled paths: static graphs for known sizes, one dynamic graph for the rest."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from deployments.runtime.compile_cache import raise_recompile_limit


class StaticOrDynamicDecoder:
    """The VAE decoder compiled twice: a static-shape graph per shape seen while `recording_static()`
    (the warm-up sizes and their tiles), and one graph dynamic in height and width for every other size.

    Measured on an H200 at 1024x1024: the static graph decodes in 36 ms, the dynamic one in 45 ms
    (RESULTS.md, stages of 2026-11-22); but static graphs alone would compile on the first request of
    every new size (15 s at 512, 36 s at 1024 and 2048: RESULTS.md, earlier round).
    Two separate top-level functions keep the two sets of graphs apart in dynamo's cache.

    `dynamic_warm=False`: a shape without a static graph decodes eagerly (compiling nothing) until
    `dynamic_warm` is set, except inside `warming_dynamic()`; so a replica can report ready after
    its static graphs and compile the dynamic one after ready (`VaeDecoder.warm_up_after_ready`).
    """

    def __init__(self, forward: Callable[..., Any], backend: str = "inductor", dynamic_warm: bool = True):
        def static_decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return forward(z, *args, **kwargs)

        def dynamic_decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return forward(z, *args, **kwargs)

        self._static = torch.compile(static_decode, dynamic=False, backend=backend)
        self._dynamic = torch.compile(dynamic_decode, dynamic=None, backend=backend)
        self._eager = forward
        self.static_shapes: set[tuple[int, ...]] = set()
        self.dynamic_warm = dynamic_warm
        self._recording = False
        self._warming = False

    def __call__(self, z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # A tiled decode passes each tile as a view of the whole latents, whose strides depend on the
        # image's size: dynamo guards on strides, so every new image size would recompile (and a tile
        # the shape of a static size would miss its static graph). A contiguous copy of a latent tile
        # costs microseconds.
        z = z.contiguous()
        shape = tuple(z.shape)
        if self._recording:
            self.static_shapes.add(shape)
        if shape in self.static_shapes:
            return self._static(z, *args, **kwargs)
        if not (self.dynamic_warm or self._warming):
            return self._eager(z, *args, **kwargs)
        torch._dynamo.maybe_mark_dynamic(z, [2, 3])
        return self._dynamic(z, *args, **kwargs)

    def recording_static(self) -> contextlib.AbstractContextManager[None]:
        """Shapes decoded inside get static graphs from now on."""
        return self._while_set("_recording")

    def warming_dynamic(self) -> contextlib.AbstractContextManager[None]:
        """Shapes decoded inside use (and compile) the dynamic graph even before `dynamic_warm`."""
        return self._while_set("_warming")

    @contextlib.contextmanager
    def _while_set(self, flag: str) -> Iterator[None]:
        setattr(self, flag, True)
        try:
            yield
        finally:
            setattr(self, flag, False)


def dynamic_warmup_shapes(tile_latent: int) -> list[tuple[int, int]]:
    """Latent (height, width) shapes that warm the dynamic graph for every tile a tiled decode cuts.

    A tiled decode's edge tiles can be any size from 2 latent cells up to `tile_latent` on each side
    (a 1040x1040 image's corner tile is 2x2). Dynamo guards the dynamic graph on size thresholds of
    the convolutions (a CPU run of the tiny VAE recompiled at 160, 320, 640 and 1280 latent cells
    times channels), so one graph per class: a ladder of sides, both orientations, hits each class.
    """
    sides = sorted({2, 8, 32, 128, tile_latent} | {min(2**k, tile_latent) for k in (2, 4, 6)})
    return [(h, w) for h in sides for w in sides]


def optimize_vae(
    vae: nn.Module, compile: bool = False, channels_last: bool = True, *, backend: str = "inductor",
    dynamic_warm: bool = True,
) -> nn.Module:
    """Channels-last memory (cuDNN's preferred convolution layout on tensor cores) and optional compile.

    Compiling fuses GroupNorm + SiLU + residual adds, where the decoder spends much of its time at
    high resolution. The decoder becomes a `StaticOrDynamicDecoder` (`vae.decoder.forward`): sizes
    decoded under its `recording_static()` run static graphs, every other size one dynamic graph
    (eagerly until it is warm, with `dynamic_warm=False`).
    The encoder (edits only) stays eager: compiled, it compiled on the first edit (a first edit took
    17.6 s on an H200: RESULTS.md, operations round of 2026-11-30, "before"), and an upload may have any fitted size, so warming it would take the
    decoder's whole ladder of shapes at start-up for a rare request whose eager encode of 1024x1024
    takes tens of milliseconds.
    """
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    if compile:
        raise_recompile_limit()
        vae.decoder.forward = StaticOrDynamicDecoder(type(vae.decoder).forward.__get__(vae.decoder), backend,
                                                     dynamic_warm)
    return vae
