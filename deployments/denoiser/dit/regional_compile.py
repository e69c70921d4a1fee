"""Regional compilation of the DiT: the repeated blocks share one compiled graph.

Inductor's and Triton's caches go to a chosen directory (`compile_cache`) so that other processes
on the node start warm.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deployments.runtime.compile_cache import configure_compile_cache, load_compile_artifacts, raise_recompile_limit


# Block inputs whose batch (0) and sequence (1) dimensions vary between calls.
_DYNAMIC_DIMS: dict[str, tuple[int, ...]] = {
    "x": (0, 1),
    "attn_mask": (0, 1),
    "freqs_cis": (0, 1),
    "adaln_input": (0,),
    "noise_mask": (0, 1),
    "adaln_noisy": (0,),
    "adaln_clean": (0,),
}


def _mark_dynamic(name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor) and name in _DYNAMIC_DIMS:
        torch._dynamo.maybe_mark_dynamic(value, list(_DYNAMIC_DIMS[name]))


def _marked_forward(block: nn.Module, compiled: Any) -> Any:
    """An eager `forward` for one block: marks the batch and sequence dims, then calls the shared graph.
    It takes the block class's own inputs (its `forward`'s signature), passed on in that order."""
    signature = inspect.signature(type(block).forward)

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        bound = signature.bind(block, *args, **kwargs)
        bound.apply_defaults()
        inputs = dict(bound.arguments)
        inputs.pop(next(iter(inputs)))  # the block itself
        freqs_cis = inputs.get("freqs_cis")
        if isinstance(freqs_cis, torch.Tensor) and not freqs_cis.is_contiguous():
            # diffusers slices the padded rotary table for some batches: another stride, which would
            # be another graph (compiled on a live request) for the same shapes.
            inputs["freqs_cis"] = freqs_cis.contiguous()
        for name, value in inputs.items():
            _mark_dynamic(name, value)
        return compiled(block, *inputs.values())

    return forward


def compile_blocks(
    transformer: nn.Module,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    dynamic: bool | None = True,
    fullgraph: bool = True,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    artifacts_name: str = "dit",
) -> nn.Module:
    """Regional compilation: every repeated block runs one shared compiled graph (per input variant).

    Dynamic shapes, `dynamic=True` (default): the sequence length changes with the image size and the
    caption length (padded to multiples of 32, so up to 16 buckets at a 512-token cap), and the
    refiners and the main layers see different lengths; static shapes would recompile per
    (size, caption bucket) and soon hit dynamo's recompile limit, silently falling back to eager.
    So exactly the batch and sequence dimensions of the block inputs are marked dynamic before each
    call; all other dims stay static. (`torch.compile(dynamic=True)` would also make the rotary
    table's trailing 2 and 64 symbolic and, by duck sizing, tie them to an equal batch size, which
    recompiles on the next batch size.) The GEMMs and attention are library kernels that do not care;
    only the fused element-wise and norm kernels are generated for a symbolic length. Graph variants
    that remain: batch 1 vs more (size-1 dims are specialized), no mask vs a ragged-batch mask,
    modulated blocks vs the context refiner: at most 6, compiled up front by `warmup`.
    `dynamic=False` compiles static shapes (one graph per shape), `None` leaves it to dynamo's
    automatic dynamic shapes (static first, dynamic on the first change).
    """
    configure_compile_cache(cache_dir)
    load_compile_artifacts(cache_dir, artifacts_name)
    raise_recompile_limit()
    options: dict[str, Any] = {"fullgraph": fullgraph, "backend": backend}
    if mode is not None:
        options["mode"] = mode
    names = set(getattr(transformer, "_repeated_blocks", None) or ["ZImageTransformerBlock"])
    blocks = [module for module in transformer.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no repeated blocks ({', '.join(sorted(names))})")
    compiled_by_class: dict[type, Any] = {}
    for block in blocks:
        block.__dict__.pop("forward", None)  # a previous compile_blocks' wrapper
        if dynamic is True:
            cls = type(block)
            if cls not in compiled_by_class:
                compiled_by_class[cls] = torch.compile(cls.forward, dynamic=None, **options)
            block.forward = _marked_forward(block, compiled_by_class[cls])
        else:
            block.compile(dynamic=dynamic, **options)
    transformer._compile_artifacts = (cache_dir, artifacts_name)
    return transformer
