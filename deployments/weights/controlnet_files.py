"""The published Z-Image-Turbo Fun ControlNet Union single files (1.0, 2.0, 2.1): which one a file
is, the diffusers config it loads with, and the load itself, without the network.

diffusers' `ZImageControlNetModel.from_single_file` tells 1.0 from 2.x by key names, then 2.0 from
2.1 by whether `control_noise_refiner.0.before_proj.weight` is all zeros, and fetches the config from
a hub repository (`hlky/Z-Image-Turbo-Fun-Controlnet-Union-2.1` and its siblings), which fails where
there is no network. The three configs ship here instead (`controlnet_configs/<name>/config.json`),
and a file is matched to one by its own key names and shapes:

- 1.0: 6 control layers (after main layers 0, 5, 10, ..., 25), 16 control channels (no mask), and
  two plain refiner blocks over the control context;
- 2.0: 15 control layers (after every other main layer), 33 control channels (the latents, then
  the inpainting mask and the masked image's latents); its file holds control refiner blocks whose
  `before_proj` is zero and which diffusers leaves out ("control_layers": the control layers refine);
- 2.1: 2.0's keys with a trained control refiner (two blocks adding hints to the main refiner).

The file's shapes also give the model's size (`dim`, heads, refiner blocks), which the published
files share (3840, 30, 2): a file of the same layout at another size (the tests' tiny ones) loads too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from deployments.weights.model_source import ModelSourceError

CONFIG_ROOT = Path(__file__).resolve().parent / "controlnet_configs"
NAMES = {version: f"Z-Image-Turbo-Fun-Controlnet-Union-{version}" for version in ("1.0", "2.0", "2.1")}
REFINER_BEFORE_PROJ = "control_noise_refiner.0.before_proj.weight"
EMBEDDER = re.compile(r"control_all_x_embedder\.(\d+)-(\d+)\.weight")


def union_config(version: str) -> dict:
    """The shipped diffusers config of Union `version` ("1.0", "2.0" or "2.1"), as the model's kwargs."""
    data = json.loads((config_dir(version) / "config.json").read_text())
    return {key: value for key, value in data.items() if not key.startswith("_")}


def config_dir(version: str) -> Path:
    """The directory holding Union `version`'s `config.json` (what `from_single_file(config=...)` reads)."""
    if version not in NAMES:
        raise ValueError(f"unknown Union version {version!r}; shipped: {', '.join(NAMES)}")
    return CONFIG_ROOT / NAMES[version]


@dataclass(frozen=True)
class UnionLayout:
    """What a single file's keys and shapes say: its Union version and the model's size."""

    version: str
    dim: int
    n_heads: int
    n_kv_heads: int
    n_refiner_layers: int

    def config(self) -> dict:
        """The model's kwargs: the version's shipped config at the file's size."""
        return {**union_config(self.version), **self.sizes()}

    def sizes(self) -> dict:
        return {"dim": self.dim, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "n_refiner_layers": self.n_refiner_layers}


def expected_shapes(layout: UnionLayout) -> dict[str, tuple[int, ...]]:
    """The tensors diffusers' model of `layout` holds (built on the meta device: no memory, no init)."""
    from diffusers import ZImageControlNetModel

    with torch.device("meta"):
        model = ZImageControlNetModel(**layout.config())
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _indices(shapes: Mapping[str, Sequence[int]], prefix: str) -> list[int]:
    return sorted({int(name[len(prefix):].split(".", 1)[0]) for name in shapes if name.startswith(prefix)})


def checkpoint_layout(shapes: Mapping[str, Sequence[int]], refiner_before_proj_is_zero: bool | None,
                      what: str = "the controlnet file") -> UnionLayout:
    """The Union layout of a checkpoint, from its tensor names and shapes and whether its first control
    refiner block's `before_proj` is all zeros (None: the file has no such tensor). A layout that is
    none of the published ones is a `ModelSourceError` saying what the file holds."""
    embedders = [(m, shapes[m.string]) for name in shapes if (m := EMBEDDER.fullmatch(name))]
    layers, refiners = _indices(shapes, "control_layers."), _indices(shapes, "control_noise_refiner.")
    if len(embedders) != 1 or not layers:
        raise ModelSourceError(f"{what} is not a Z-Image ControlNet: it has no control layers and control "
                               "embedder (`control_layers.*`, `control_all_x_embedder.*`)")
    match, (dim, patch_dim) = embedders[0]
    patch, f_patch = int(match.group(1)), int(match.group(2))
    head_dim = shapes.get("control_layers.0.attention.norm_q.weight", (0,))[0]
    refiner_is_control = "control_noise_refiner.0.after_proj.weight" in shapes
    if len(layers) == 6 and refiners and not refiner_is_control:
        version = "1.0"
    elif len(layers) == 15 and (refiner_is_control or not refiners):
        version = "2.1" if refiner_before_proj_is_zero is False else "2.0"
    else:
        version = None
    config = union_config(version) if version else None
    in_dim = patch_dim // (patch * patch * f_patch)
    if (config is None or layers != list(range(len(config["control_layers_places"])))
            or in_dim != config["control_in_dim"] or (patch, f_patch) != (2, 1) or not head_dim):
        raise ModelSourceError(
            f"{what} matches none of the published Z-Image-Turbo Fun ControlNet Union layouts: it has "
            f"{len(layers)} control layers, {len(refiners)} control refiner blocks"
            f"{' with control projections' if refiner_is_control else ''}, {in_dim} control channels, "
            f"patch {patch}-{f_patch}{'' if head_dim else ' and no query norm'}; Union 1.0 has 6 control layers, "
            "2 plain refiner blocks and 16 channels, 2.0 and 2.1 have 15 control layers, 2 control refiner "
            "blocks and 33 channels (patch 2-1, query and key norms)")
    return UnionLayout(version, dim=dim, n_heads=dim // head_dim,
                       n_kv_heads=shapes["control_layers.0.attention.to_k.weight"][0] // head_dim,
                       n_refiner_layers=len(refiners) or config["n_refiner_layers"])


def state_dict_layout(state_dict: Mapping[str, torch.Tensor], what: str = "the controlnet file") -> UnionLayout:
    """`checkpoint_layout` of a loaded state dict."""
    before_proj = state_dict.get(REFINER_BEFORE_PROJ)
    zero = None if before_proj is None else not bool(before_proj.any())
    return checkpoint_layout({name: tuple(t.shape) for name, t in state_dict.items()}, zero, what)


def file_layout(path: str | Path) -> UnionLayout:
    """`checkpoint_layout` of a `.safetensors` file, from its header and one tensor (no other weights read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            zero = not bool(f.get_tensor(REFINER_BEFORE_PROJ).any()) if REFINER_BEFORE_PROJ in shapes else None
    except (SafetensorError, OSError) as exc:
        raise ModelSourceError(f"controlnet file {path}: not a readable .safetensors file ({exc})") from None
    return checkpoint_layout(shapes, zero, f"controlnet file {path}")


def load_single_file(path: str, dtype: torch.dtype):
    """A published single file through diffusers' `from_single_file`, with the shipped config of the
    layout its keys and shapes show and nothing fetched. Every weight of that layout must be in the
    file, at its shape: diffusers would leave a missing one uninitialised, unreported."""
    from diffusers import ZImageControlNetModel

    checkpoint = read_checkpoint(path)
    layout = state_dict_layout(checkpoint, f"controlnet file {path}")
    held = {name: tuple(tensor.shape) for name, tensor in checkpoint.items()}
    wrong = [name for name, shape in expected_shapes(layout).items() if held.get(name) != shape]
    if wrong:
        raise ModelSourceError(f"controlnet file {path} (Union {layout.version} layout) lacks {len(wrong)} weights "
                               f"of that layout or has them at other shapes, e.g. {', '.join(wrong[:3])}")
    return ZImageControlNetModel.from_single_file(checkpoint, config=str(config_dir(layout.version)),
                                                  local_files_only=True, torch_dtype=dtype, **layout.sizes())


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A single file's tensors on the CPU: `.safetensors`, or a torch pickle read with `weights_only`."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(checkpoint, dict) and "state_dict" in checkpoint:  # as diffusers unwraps a .ckpt
        checkpoint = checkpoint["state_dict"]
    return checkpoint
