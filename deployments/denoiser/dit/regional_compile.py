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


def _marked_forward(block: nn.Module, compiled: Any) -> Any:
    """An eager `forward` for one block: marks the batch and sequence dims, then calls the shared graph.
    It takes the block class's own inputs (its `forward`'s signature, read once here) and passes them
    on positionally, defaults filled in."""
    params = list(inspect.signature(type(block).forward).parameters.values())[1:]  # after `self`
    names = [p.name for p in params]
    position = {name: i for i, name in enumerate(names)}
    defaults = [p.default for p in params]
    dynamic_dims = [list(_DYNAMIC_DIMS[name]) if name in _DYNAMIC_DIMS else None for name in names]
    freqs_at = position.get("freqs_cis")

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        values = [*args, *defaults[len(args):]]
        for name, value in kwargs.items():
            values[position[name]] = value
        if any(value is inspect.Parameter.empty for value in values):
            missing = [name for name, value in zip(names, values) if value is inspect.Parameter.empty]
            raise TypeError(f"{type(block).__name__}.forward() missing {', '.join(missing)}")
        if freqs_at is not None and not values[freqs_at].is_contiguous():
            # diffusers slices the padded rotary table for some batches: another stride, which would
            # be another graph (compiled on a live request) for the same shapes.
            values[freqs_at] = values[freqs_at].contiguous()
        for dims, value in zip(dynamic_dims, values):
            if dims is not None and isinstance(value, torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(value, dims)
        return compiled(block, *values)

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
    transformer._block_compiler = BlockCompiler(dynamic, options)
    transformer._block_compiler.compile(blocks)
    transformer._compile_artifacts = (cache_dir, artifacts_name)
    return transformer


class BlockCompiler:
    """What `compile_blocks` did to a model's blocks, kept on the model (`block_compiler`) so that blocks
    joining later (the ControlNet's control blocks, `denoiser.control_blocks`) run the same compiled
    graphs: one `torch.compile` per block class, shared by every block of that class."""

    def __init__(self, dynamic: bool | None, options: dict[str, Any]):
        self.dynamic = dynamic
        self.options = options
        self.compiled_by_class: dict[type, Any] = {}

    def compile(self, blocks) -> None:
        for block in blocks:
            block.__dict__.pop("forward", None)  # a previous compile's wrapper
            if self.dynamic is True:
                cls = type(block)
                if cls not in self.compiled_by_class:
                    self.compiled_by_class[cls] = torch.compile(cls.forward, dynamic=None, **self.options)
                block.forward = _marked_forward(block, self.compiled_by_class[cls])
            else:
                block.compile(dynamic=self.dynamic, **self.options)


def block_compiler(model: nn.Module) -> BlockCompiler | None:
    """The compiler `compile_blocks` left on `model` (None where its blocks run uncompiled)."""
    return getattr(model, "_block_compiler", None)
