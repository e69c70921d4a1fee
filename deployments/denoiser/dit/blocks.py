"""Where a Z-Image DiT keeps its repeated transformer blocks, and its device and dtype."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

BLOCK_LISTS = ("noise_refiner", "context_refiner", "siglip_refiner", "layers")


def iter_blocks(transformer: nn.Module) -> Iterator[nn.Module]:
    """The repeated transformer blocks, refiners first, in execution order."""
    for name in BLOCK_LISTS:
        blocks = getattr(transformer, name, None)
        if blocks is not None:
            yield from blocks


def model_device_dtype(transformer: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = transformer.x_pad_token
    return param.device, param.dtype
