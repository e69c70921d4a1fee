"""The text encoder's optional regional compile (its layers are replayed inside CUDA graphs)."""

from __future__ import annotations

from torch import nn

from deployments.runtime.compile_cache import raise_recompile_limit


def optimize_text_encoder(encoder: nn.Module, compile: bool = False, *, backend: str = "inductor") -> nn.Module:
    """Optional regional compile of the Qwen3 decoder layers, dynamic in the sequence length.

    Prompts vary in length token by token. Dynamo's automatic dynamic shapes compile the first
    length statically and, on the first different length, one graph with a symbolic length (only
    the dims that changed become symbolic; `dynamic=True` would also make the head and rotary dims
    symbolic). Compiling the layers, not the whole model, keeps the mask construction eager and the
    compile short.
    """
    if compile:
        raise_recompile_limit()
        for layer in encoder.layers:
            layer.compile(dynamic=None, backend=backend)
    return encoder
