"""Warm-up: every graph and attention plan a request will need, made before a replica serves it.

A warm-up is a list of `WarmupCall`s (one forward each on random inputs), so that a replica can run
part of it before it reports ready and the rest afterwards, one call at a time between requests
(`deployments.denoiser.batched_warmup`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from deployments.runtime.compile_cache import save_compile_artifacts
from deployments.denoiser.dit.blocks import model_device_dtype


@dataclass(frozen=True)
class WarmupCall:
    """One warm-up forward: an image size and one caption length per image of the batch."""

    key: str  # `WxH/bN[/ragged|/capL][/lora]`
    width: int
    height: int
    caption_lens: tuple[int, ...]
    lora_rank: int = 0
    """With a rank, the first image carries a zero LoRA adapter of that rank (`lora.slots`): the
    compiled graphs of forwards with adapters, which any adapter, rank or mix then reuses."""
    control: str = ""
    """"control" or "mask": the first image carries a random control input, plain or in the inpainting
    layout (`ControlNetRunner.warmup_controls`; the calls are planned by `denoiser.control_warmup`),
    so the ControlNet's first calls at this shape happen here."""

    @property
    def batch(self) -> int:
        return len(self.caption_lens)


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def warmup_calls(
    sizes: Iterable[int | tuple[int, int]],
    caption_len: int = 160,
    *,
    batch_sizes: Sequence[int] = (1,),
    ragged: bool = True,
    caption_buckets: Sequence[int] = (),
) -> list[WarmupCall]:
    """The calls `warmup` makes, in its order (see there for why each)."""
    calls = []
    for size in sizes:
        width, height = _as_size(size)
        for batch in batch_sizes:
            calls.append(WarmupCall(f"{width}x{height}/b{batch}", width, height, (caption_len,) * batch))
            if batch == 1:
                for length in caption_buckets:  # one token short: the model pads it, as most captions
                    calls.append(WarmupCall(f"{width}x{height}/b1/cap{length}", width, height, (max(1, length - 1),)))
            if batch > 1 and ragged:
                lens = tuple(max(1, caption_len - 33 * (i % 2)) for i in range(batch))
                calls.append(WarmupCall(f"{width}x{height}/b{batch}/ragged", width, height, lens))
    return calls


def call_inputs(transformer: nn.Module, call: WarmupCall, generator: torch.Generator | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """Random (latents, t, captions) of `call`'s shapes, on the model's device and in its dtype."""
    from deployments.geometry import latent_shape

    device, dtype = model_device_dtype(transformer)
    generator = generator or torch.Generator("cpu").manual_seed(0)
    shape = latent_shape(transformer.config.in_channels, call.width, call.height)
    latents = [torch.randn(shape, generator=generator).to(device, dtype).unsqueeze(2)[0] for _ in call.caption_lens]
    captions = [torch.randn(n, transformer.config.cap_feat_dim, generator=generator).to(device, dtype)
                for n in call.caption_lens]
    return latents, torch.full((call.batch,), 0.5, device=device), captions


@torch.inference_mode()
def run_call(transformer: nn.Module, call: WarmupCall, generator: torch.Generator | None = None,
             control=None) -> float:
    """One warm-up forward on random inputs; returns its seconds (device-synchronized). Runs under
    `inference_mode`, as the denoise loop does (a different grad mode would be a different graph).
    A controlled `call` runs through `control` (the `ControlNetRunner`); its outputs are dropped."""
    device, dtype = model_device_dtype(transformer)
    latents, t, captions = call_inputs(transformer, call, generator)
    forward = partial(transformer, return_dict=False)
    if call.control:
        if control is None:
            raise ValueError(f"warm-up call {call.key} is controlled, and no ControlNet is loaded")
        forward = partial(control.forward, controls=control.warmup_controls(call, generator))
    adapters = contextlib.nullcontext()
    if call.lora_rank:
        slots = transformer._lora_slots
        zero = slots.zero_adapter(call.lora_rank)
        adapters = slots.using([((zero, 1.0),)] + [()] * (call.batch - 1))
    _sync(device)
    start = time.perf_counter()
    with adapters:
        forward(latents, t, captions)
    _sync(device)
    seconds = time.perf_counter() - start
    if call.lora_rank:
        transformer._lora_slots.forget()  # the zero adapter's plans
    return seconds


def persist_artifacts(transformer: nn.Module) -> None:
    """Writes the mega-cache file when `compile_blocks` was given a cache directory, so a fresh node
    can start from that one file."""
    cache_dir, artifacts_name = getattr(transformer, "_compile_artifacts", (None, "dit"))
    if cache_dir is not None:
        save_compile_artifacts(cache_dir, artifacts_name)


def run_calls(transformer: nn.Module, calls: Iterable[WarmupCall], save: bool = True,
              control=None) -> dict[str, float]:
    """Runs `calls` in order; seconds per call by key. `save`: then writes the mega-cache file.
    `control`: the `ControlNetRunner` that controlled calls run through."""
    generator = torch.Generator("cpu").manual_seed(0)
    timings = {call.key: run_call(transformer, call, generator, control) for call in calls}
    if save:
        persist_artifacts(transformer)
    return timings


def warmup(
    transformer: nn.Module,
    sizes: Iterable[int | tuple[int, int]],
    caption_len: int = 160,
    *,
    batch_sizes: Sequence[int] = (1,),
    ragged: bool = True,
    caption_buckets: Sequence[int] = (),
    save_artifacts: bool = True,
) -> dict[str, float]:
    """Runs one forward per size (width, height in pixels, or one int for a square) on random inputs.

    Compiles every graph a request will need, so no request pays for compilation: for each batch
    size over 1 it also runs equal caption lengths (no mask) and, with `ragged`, unequal ones (the
    masked graph). `caption_buckets` (padded caption lengths) are run once each at
    batch 1: the graphs are shared, but cuDNN plans its attention per shape (tens of ms each,
    twice per forward: the caption refiner and the main layers), which a single request with a new
    caption length would otherwise pay; they run one token short of the bucket, so the graph of a
    caption the model pads (a first request compiled one, measured) is compiled here too. Returns
    seconds per call, keyed `WxH/bN[/ragged|/capL]`. When `compile_blocks` was given a cache directory, also writes the mega-cache file there
    (`save_artifacts`), so a fresh node can start from that one file.
    """
    calls = warmup_calls(sizes, caption_len, batch_sizes=batch_sizes, ragged=ragged, caption_buckets=caption_buckets)
    return run_calls(transformer, calls, save=save_artifacts)


def serving_calls(
    sizes: Iterable[int | tuple[int, int]], max_batch_size: int, max_caption_tokens: int, lora: bool = False
) -> tuple[list[WarmupCall], list[WarmupCall]]:
    """The serving warm-up, cut in two: (batch-1 calls, calls of batches over 1).

    Batch sizes 1, 2 and the largest: two sizes over 1 make sure the graph for batches over 1 is the
    dynamic one (a first compile may specialize on the batch size it saw, and the next batch size
    would then stall a live request for a recompile). Every caption bucket the DiT pads to, up to
    `max_caption_tokens`, at batch 1 (cuDNN's attention plans; padded captions' graph). A replica
    that runs its batches one image per forward until the second list has run can report ready
    after the first. `lora`: also the graphs of forwards with LoRA adapters, for the same batches.
    """
    from deployments.denoiser.dit.caption_buckets import SEQ_MULTI_OF, caption_bucket

    batch_sizes = sorted({1, min(2, max_batch_size), max_batch_size})
    buckets = range(SEQ_MULTI_OF, caption_bucket(max_caption_tokens) + 1, SEQ_MULTI_OF)  # 500 tokens: up to 512
    calls = warmup_calls(sizes, batch_sizes=batch_sizes, caption_buckets=buckets)
    if lora:  # with adapters (`lora.slots`): each batch size, unmasked and masked (ragged), a padded caption
        padded = {(c.width, c.height): c for c in reversed(calls) if "/cap" in c.key}  # one padded caption each
        calls += [replace(call, key=f"{call.key}/lora", lora_rank=32) for call in calls
                  if "/cap" not in call.key or padded.get((call.width, call.height)) is call]
    return [c for c in calls if c.batch == 1], [c for c in calls if c.batch > 1]


def warm_for_serving(
    transformer: nn.Module, sizes: Iterable[int | tuple[int, int]], max_batch_size: int, max_caption_tokens: int
) -> dict[str, float]:
    """The whole serving warm-up (`serving_calls`, both parts) in one go."""
    single, batched = serving_calls(sizes, max_batch_size, max_caption_tokens)
    return run_calls(transformer, single + batched)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
