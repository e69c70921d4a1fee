"""Random LoRA adapter files for the tiny model, in diffusers' format and in the kohya/ComfyUI trainer format."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from deployments.denoiser.lora.adapter import model_slots

TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def random_factors(transformer, rank: int, seed: int, strength: float = 0.5,
                   targets: tuple[str, ...] = TARGETS) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module: (A [r, in], B [out, r])}` on every targeted block linear, big enough to change the image."""
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
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.safetensors"
    save_file(state, str(path), metadata=metadata)
    return path


def hub_cache(cache: Path, repo_id: str, filename: str, state: dict[str, torch.Tensor],
              commit: str = "0123456789abcdef0123456789abcdef01234567", ref: str = "main") -> Path:
    """Puts an adapter file into a Hugging Face hub cache as `hf_hub_download` leaves it (the blob under
    its hash, a snapshot symlink per commit, `refs/<ref>` naming the commit), so that the real
    resolution runs offline (`HF_HUB_OFFLINE=1`)."""
    import hashlib
    import os
    import tempfile

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "file.safetensors"
        save_file(state, str(staged))
        data = staged.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    pointer = repo / "snapshots" / commit / filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return pointer
