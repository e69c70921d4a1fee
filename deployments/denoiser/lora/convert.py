"""Reading an adapter file and converting its keys to diffusers' names, by diffusers' own code.

Published Z-Image adapters come as diffusers/PEFT keys (`transformer.layers.0.attention.to_q.lora_A.weight`)
or in the trainers' formats (kohya/ComfyUI `lora_unet_layers_0_attention_to_q.lora_down.weight` with
`.alpha`, `diffusion_model.` prefixes, ...). The trainers' formats go through diffusers' Z-Image converter,
a private function of diffusers 0.42.1 (pinned in pyproject.toml): this module is the one place that calls
it, with the same test diffusers' `ZImageLoraLoaderMixin.lora_state_dict` uses to decide whether to, and
tests/unit/test_lora_files.py checks that our result is that method's.

Only `.safetensors` files are read (never pickle). diffusers' Z-Image loader loads into the transformer
only, so text-encoder weights are refused, and so are DoRA, LoKr and LoHa files, which have no unmerged
low-rank form here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from deployments.denoiser.lora.errors import LoraFormatError

TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_", "te.", "te1.")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def _diffusers_converter() -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    return _convert_non_diffusers_z_image_lora_to_diffusers


def _needs_conversion(keys: list[str]) -> bool:
    """diffusers' own test (`ZImageLoraLoaderMixin.lora_state_dict`) for a non-diffusers state dict."""
    return (
        any(k.endswith(".alpha") for k in keys)
        or any(k.startswith("lora_unet_") for k in keys)
        or any(k.startswith("diffusion_model.") for k in keys)
        or any("default." in k for k in keys)
    )


def refuse_unsupported(keys: list[str]) -> None:
    """Text-encoder weights, DoRA, LoKr and LoHa: a message that says which, naming a key."""
    for key in keys:
        if key.startswith(TEXT_ENCODER_PREFIXES):
            raise LoraFormatError(
                f"the adapter has text-encoder weights ({key!r}); Z-Image adapters apply to the transformer only"
            )
        if "dora_scale" in key or "lora_magnitude_vector" in key:
            raise LoraFormatError(f"DoRA adapters are not supported ({key!r})")
        if ".lokr_" in key or "lokr_w" in key:
            raise LoraFormatError(f"LoKr adapters are not supported ({key!r})")
        if ".hada_" in key:
            raise LoraFormatError(f"LoHa adapters are not supported ({key!r})")


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("transformer.", "base_model.model."):
        if any(k.startswith(prefix) for k in state_dict):
            return {k.removeprefix(prefix): v for k, v in state_dict.items()}
    return state_dict


def to_diffusers_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`{module}.lora_A.weight` / `{module}.lora_B.weight` with module paths of the transformer, any
    trainer's alpha folded into the factors (as diffusers folds it)."""
    keys = list(state_dict)
    refuse_unsupported(keys)
    state = _strip_prefix(dict(state_dict))
    if _needs_conversion(list(state)):
        state = _diffusers_converter()(state)
    state = _strip_prefix(state)
    for key in state:
        if not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
            raise LoraFormatError(f"not a LoRA factor after conversion: {key!r}")
    return state


def metadata_scaling(metadata: Mapping[str, str] | None) -> float:
    """`lora_alpha / r` from the file's diffusers metadata (PEFT's scaling); 1.0 without it."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return 1.0
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraFormatError(f"unreadable {METADATA_KEY} in the file's metadata: {exc}") from exc
    if config.get("use_dora"):
        raise LoraFormatError("DoRA adapters are not supported (use_dora in the file's metadata)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoraFormatError("per-module rank_pattern/alpha_pattern in the file's metadata are not supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    return float(alpha) / float(r) if r and alpha else 1.0


def read_safetensors(path: Path, *, meta: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a `.safetensors` file. `meta=True` reads only the header (and the
    scalar alphas, which conversion needs as values): shapes without the weights, for listing."""
    if path.suffix != ".safetensors":
        raise LoraFormatError(f"only .safetensors adapter files are read, not {path.name!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {}
            for key in f.keys():
                if meta and not key.endswith(".alpha"):
                    piece = f.get_slice(key)
                    tensors[key] = torch.empty(piece.get_shape(), dtype=_dtype(piece.get_dtype()), device="meta")
                else:
                    tensors[key] = f.get_tensor(key)
    except LoraFormatError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # unreadable or not safetensors
        raise LoraFormatError(f"{path.name}: not a readable safetensors file ({exc})") from exc
    return tensors, metadata


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise LoraFormatError(f"adapter tensors must be floating point, not {name}")
    return _DTYPES[name]
