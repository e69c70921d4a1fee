"""The `controlnet` setting: which Z-Image ControlNet the Denoiser loads, and the tiny one for tests.

- a hub id or a local directory in diffusers layout (`config.json` and weights of a
  `ZImageControlNetModel`, as `save_pretrained` writes it), or a published single file
  (`.safetensors`: Z-Image-Turbo-Fun-Controlnet-Union 1.0, 2.0 or 2.1) read by diffusers'
  `from_single_file` with the config of its layout, shipped in the project (`weights.controlnet_files`):
  no network;
- `tiny`: a small random ControlNet for the `tiny` checkpoint, built deterministically on first use
  into the cache beside it (as `tiny_checkpoint` builds the model) and loaded through the same
  `from_pretrained` path. Its zero-initialised projections (`before_proj`, `after_proj`, which a
  trained ControlNet has learnt away from zero) are drawn at random too, so that its hints change
  the image and a test comparing with and without control can fail;
- `random`: the full-size Union 2.1 architecture (its shipped config) with random weights, for speed
  and memory work.

The Union 2.x layout takes 33 control channels (control latents, then the inpainting mask and the
masked image's latents), so one model serves plain control and control with a mask. The Union 1.0
layout takes the 16 control latents alone: it controls generations and cannot inpaint (its tiny
twin, `ensure_tiny_controlnet(..., mask_channels=False)`, lets tests check that such a server
refuses inpainting with control).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from deployments.weights.controlnet_files import file_layout, load_single_file, union_config
from deployments.weights.model_source import ModelSourceError, WeightsSource, default_cache_dir
from deployments.weights.tiny_checkpoint import TINY_TRANSFORMER_CONFIG, build_once

TINY_CONTROLNET_VERSION = "tiny-controlnet-v1"
SINGLE_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt")

TINY_CONTROLNET_CONFIG = {
    "control_layers_places": [0, 1],
    "control_refiner_layers_places": [0],
    "control_in_dim": 33,
    "add_control_noise_refiner": "control_noise_refiner",
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "dim": TINY_TRANSFORMER_CONFIG["dim"],
    "n_refiner_layers": TINY_TRANSFORMER_CONFIG["n_refiner_layers"],
    "n_heads": TINY_TRANSFORMER_CONFIG["n_heads"],
    "n_kv_heads": TINY_TRANSFORMER_CONFIG["n_kv_heads"],
    "norm_eps": 1e-5,
    "qk_norm": True,
}

# Union 1.0's layout at the tiny size: 16 control channels (no mask), no control refiner of its own.
TINY_CONTROL_ONLY_CONFIG = {**TINY_CONTROLNET_CONFIG, "control_in_dim": 16, "add_control_noise_refiner": None}

# Union 2.1's shape: a control block after every other main layer (15 of 30), two control refiner
# blocks, 33 control channels.
FULL_CONTROLNET_CONFIG = union_config("2.1")


@dataclass(frozen=True)
class ControlNetSource(WeightsSource):
    """A resolved `controlnet` setting; `single_file` is a published checkpoint file."""

    kind: Literal["pretrained", "single_file", "random"]


def resolve_controlnet(setting: str, cache_dir: str | Path | None = None) -> ControlNetSource:
    """Turns the `controlnet` setting into a source; builds the tiny ControlNet on first use."""
    setting = setting.strip()
    if setting == "random":
        return ControlNetSource("random", "random", None)
    if setting == "tiny":
        path = ensure_tiny_controlnet(Path(cache_dir) if cache_dir else default_cache_dir())
        return ControlNetSource("pretrained", "tiny", str(path))
    path = Path(setting).expanduser()
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        if path.suffix == ".safetensors":
            file_layout(path)  # a file of no published layout fails here, when the app is built
        return ControlNetSource("single_file", setting, str(path.resolve()))
    if path.exists() or setting.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"controlnet {setting!r}: no config.json of a ZImageControlNetModel in {path}")
        return ControlNetSource("pretrained", setting, str(path.resolve()))
    if setting.count("/") == 1 and all(setting.split("/")):
        return ControlNetSource("pretrained", setting, setting)
    raise ModelSourceError(f"unknown controlnet {setting!r}: expected a hub id, a directory in diffusers layout, "
                           "a .safetensors file, 'tiny' or 'random'")


def load_controlnet(source: ControlNetSource, device: torch.device, dtype: torch.dtype):
    """The `ZImageControlNetModel`, not yet attached to a transformer (see `denoiser.control`)."""
    from diffusers import ZImageControlNetModel

    if source.kind == "random":
        torch.manual_seed(1)
        with torch.device(device):
            model = ZImageControlNetModel(**FULL_CONTROLNET_CONFIG).to(dtype)
        _randomize_zero_projections(model)
    elif source.kind == "single_file":
        model = load_single_file(source.location, dtype)
    else:
        model = ZImageControlNetModel.from_pretrained(source.location, torch_dtype=dtype,
                                                      device_map=str(device))  # read straight onto it
    if not isinstance(model, ZImageControlNetModel):
        raise ModelSourceError(f"controlnet {source.name!r} is a {type(model).__name__}, not a ZImageControlNetModel")
    return model.to(device).eval().requires_grad_(False)


def _randomize_zero_projections(model: torch.nn.Module, std: float = 0.02) -> None:
    """Draws the zero-initialised in/out projections of the control blocks (see the module docstring)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ("before_proj" in name or "after_proj" in name) and not param.any():
                param.normal_(0.0, std)


def build_tiny_controlnet(config: dict = TINY_CONTROLNET_CONFIG):
    from diffusers import ZImageControlNetModel

    torch.manual_seed(20251124)
    model = ZImageControlNetModel(**config)
    torch.manual_seed(20251125)
    _randomize_zero_projections(model, std=0.2)
    return model


def ensure_tiny_controlnet(cache_dir: Path, mask_channels: bool = True) -> Path:
    """The tiny ControlNet's directory, built once (safe with concurrent replicas): Union 2.x's layout,
    or without `mask_channels` Union 1.0's (a directory to pass as the `controlnet` setting)."""
    if mask_channels:
        return build_once(cache_dir, TINY_CONTROLNET_VERSION, build_tiny_controlnet)
    return build_once(cache_dir, f"{TINY_CONTROLNET_VERSION}-control-only",
                      lambda: build_tiny_controlnet(TINY_CONTROL_ONLY_CONFIG))
