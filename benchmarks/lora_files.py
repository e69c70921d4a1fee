"""Random LoRA adapter files for a benchmark's server: rank-r factors on every attention and
feed-forward linear of the model's DiT, in diffusers' format, bf16 (a rank-32 adapter of the full-size
model is about 160 MB, the size of published ones).

The shapes come from the model's transformer built on the meta device from its config (no weights,
no GPU): `lora.random_adapters.transformer_on_meta`, as `zimage-lora random` does.
"""

from __future__ import annotations

from pathlib import Path

import torch


def transformer_shapes(model: str, cache_dir: str | None = None):
    """A transformer whose linears have the model's shapes, on the meta device (no weights read or made)."""
    from deployments.denoiser.lora.random_adapters import transformer_on_meta
    from deployments.weights.model_source import resolve_model_source

    return transformer_on_meta(resolve_model_source(model, cache_dir))


def write_random_adapters(transformer, directory: Path, count: int, rank: int, prefix: str = "bench") -> list[str]:
    """Writes `count` adapters `<prefix>0 ..` for `transformer`'s linears into `directory`; their names."""
    from deployments.denoiser.lora.random_adapters import diffusers_state, random_factors, write

    names = []
    for index in range(count):
        factors = random_factors(transformer, rank=rank, seed=1000 + index, strength=0.05)
        state = {key: value.to(torch.bfloat16) for key, value in diffusers_state(factors).items()}
        write(directory, f"{prefix}{index}", state)
        names.append(f"{prefix}{index}")
    return names
