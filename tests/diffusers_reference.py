"""The diffusers pipelines the parity tests compare against, built one way: over components already
loaded (no second load of the checkpoint) and with progress bars off, so test output stays readable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

F32 = torch.float32


def quiet(pipe: Any) -> Any:
    """`pipe` with its progress bars off."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controlnet_reference(t2i: Any, location: str | Path) -> Any:
    """diffusers' `ZImageControlNetPipeline`: `t2i`'s components and the ControlNet at `location` (float32)."""
    from diffusers import ZImageControlNetModel, ZImageControlNetPipeline

    controlnet = ZImageControlNetModel.from_pretrained(str(location), torch_dtype=F32)
    return quiet(ZImageControlNetPipeline(**t2i.components, controlnet=controlnet))
