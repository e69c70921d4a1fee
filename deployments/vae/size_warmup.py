"""What the VaeDecoder warms after it reports ready, so that a first request at a preset size, an
edit's upload at one and a streamed request's previews make no plan of their own.

A decode or encode at a new size makes per-shape state on its first call: cuDNN's convolution plans
for every new (channels, height, width) of the decoder or encoder, and with `vae_compile` whatever
the dynamic graph still lacks for that size. The decoder's static graphs cover the warm-up sizes,
its dynamic graph's warm-up covers the classes of shapes dynamo guards on; neither runs a preset's
own convolution shapes, the encoder (eager, edits) or the half-size previews. So, one call each,
smallest first: a decode at every preset the static graphs do not hold, a preview at every preset and
warm-up size, an encode at each (the Ingress fits an upload to an accepted size of the same aspect,
so a preset-shaped upload encodes at the preset).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from PIL import Image

from deployments.contracts import Latents
from deployments.geometry import latent_shape

Step = tuple[str, Callable[[], Any]]  # (key, a blocking call for the model thread)


def _latents(codec, width: int, height: int) -> Latents:
    channels = codec.vae.config.latent_channels
    return Latents(latents=torch.randn(latent_shape(channels, width, height)), width=width, height=height)


def decode(codec, width: int, height: int) -> None:
    codec.decode([_latents(codec, width, height)])


def preview(codec, width: int, height: int) -> None:
    codec.preview([_latents(codec, width, height)])


def encode(codec, width: int, height: int) -> None:
    codec.encode([Image.new("RGB", (width, height), (128, 96, 64))])


def size_steps(codec, sizes: Iterable[tuple[int, int]], static_sizes: Iterable[tuple[int, int]] = ()) -> list[Step]:
    """Decode (unless a static graph holds the size), preview and encode at each size, smallest first."""
    static = set(static_sizes)
    steps: list[Step] = []
    for width, height in sorted(dict.fromkeys([*static, *sizes]), key=lambda s: (s[0] * s[1], s)):
        if (width, height) not in static:
            steps.append((f"decode/{width}x{height}", partial(decode, codec, width, height)))
        steps.append((f"preview/{width}x{height}", partial(preview, codec, width, height)))
        steps.append((f"encode/{width}x{height}", partial(encode, codec, width, height)))
    return steps
