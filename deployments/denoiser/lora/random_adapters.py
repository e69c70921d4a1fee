"""Random LoRA adapters for a model's DiT: files to try the adapter path with, and to test and measure it.

Rank-r factors on every attention (q, k, v, out) and feed-forward (w1, w2, w3) linear of the DiT's
blocks, written in diffusers' format (or the kohya/ComfyUI trainers' format, which diffusers'
converter reads). `A` is scaled by 1/sqrt(in) and `B` by strength/sqrt(rank), so `strength` sets the
update's size: 0.5 visibly changes `tiny`'s images, the benchmarks use 0.05. A random adapter carries
no style; it is there to exercise loading, routing, caching and the batched adapter GEMMs.

The command line (`zimage-lora random NAME`) is in deployments/denoiser/lora/cli.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from deployments.denoiser.lora.adapter import model_slots

TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def random_factors(transformer, rank: int, seed: int, strength: float = 0.5,
                   targets: tuple[str, ...] = TARGETS) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module: (A [r, in], B [out, r])}` on every targeted block linear of `transformer` (its shapes are
    all that is read: a transformer on the meta device will do)."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for slot in model_slots(transformer).values():
        for part in slot.parts:
            if part.name.split(".", 2)[2] in targets:
                a = torch.randn(rank, slot.in_features, generator=generator) / slot.in_features**0.5
                b = torch.randn(part.out_features, rank, generator=generator) * strength / rank**0.5
                factors[part.name] = (a, b)
    return factors


def diffusers_state(factors) -> dict[str, torch.Tensor]:
    """`transformer.<module>.lora_A.weight` / `lora_B.weight`: diffusers' (and PEFT's) keys."""
    state = {}
    for module, (a, b) in factors.items():
        state[f"transformer.{module}.lora_A.weight"] = a.contiguous()
        state[f"transformer.{module}.lora_B.weight"] = b.contiguous()
    return state


def kohya_state(factors, alpha: float) -> dict[str, torch.Tensor]:
    """`lora_unet_layers_0_attention_to_q.lora_down.weight` with `.alpha`: the update is
    `alpha / rank * up @ down`, so diffusers' converter folds alpha / rank into the factors."""
    state = {}
    for module, (a, b) in factors.items():
        base = "lora_unet_" + module.replace(".", "_")
        state[f"{base}.lora_down.weight"] = a.contiguous()
        state[f"{base}.lora_up.weight"] = b.contiguous()
        state[f"{base}.alpha"] = torch.tensor(float(alpha))
    return state


def write(directory: Path, name: str, state: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """`<directory>/<name>.safetensors`, the folder made if missing; the adapter's name is the file's stem."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.safetensors"
    save_file(state, str(path), metadata=metadata)
    return path


def transformer_on_meta(source):
    """The DiT of a resolved `model` setting (deployments.weights.model_source) on the meta device: its
    shapes from its config (the full-size one for `random`), no weights read or made."""
    from diffusers import ZImageTransformer2DModel

    from deployments.weights.random_model import FULL_TRANSFORMER_CONFIG

    config = FULL_TRANSFORMER_CONFIG if source.is_random else ZImageTransformer2DModel.load_config(
        source.location, subfolder="transformer")
    with torch.device("meta"):
        return ZImageTransformer2DModel.from_config(config)
