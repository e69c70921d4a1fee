"""What the Denoiser warms after it reports ready, so that a first request at a preset size or with a
caption length not seen yet runs about as fast as the next one.

Run between requests on the model thread, one call at a time (`BatchedWarmup`), in this order:

- graphs: with `dit_cuda_graphs`, the CUDA graph of every caption bucket at each warm-up size
  (`GraphedTransformerFn.prepare`; a plain forward, then the capture). A prompt of a length the
  replica has not seen then replays a graph from its first step, instead of paying a plain
  forward and a capture at its first two. Where the replica offers LoRA adapters, then the same
  graphs for forwards with adapters (on the static factors: any adapter replays them); where a
  ControlNet is loaded, the same graphs for controlled forwards (on static control inputs: any
  control image, scale or form replays them). The controlled graphs' first forwards are the
  ControlNet's caption-bucket calls of `denoiser.control_warmup` at those sizes, which then do not
  run again.
- sizes: a first forward at a shape the start-up warm-up did not run makes what is made per shape:
  the attention's plans (cuDNN's FP8 graphs, `fp8_attention`, or SDPA's plans) per sequence length,
  which for one image are its image tokens (the image refiner), its image tokens plus its caption
  bucket (the main layers) and the bucket (the caption refiner, warm from any size), plus what a
  new latent shape makes. On an H200 (results/2026-12-01-h200/cold_path.json, fused path) a first
  1344x768 took 146 ms more than the next one, a first 768x1344 after it (the same sequence
  lengths) 23 ms more. So each preset gets one forward, and the presets with at most
  `all_buckets_up_to` image tokens (1024x1024's, where one plan is about a tenth of a request) one
  per main-layer sequence length not run yet over every caption bucket. Over that, a request takes a
  second or more and a plan a few percent of it.

Batches over one image at the presets are not covered: their attention lengths depend on the mix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import nn

from deployments.denoiser.dit.caption_buckets import SEQ_MULTI_OF, caption_bucket
from deployments.denoiser.dit.warmup import WarmupCall, call_inputs, run_call
from deployments.geometry import image_tokens

logger = logging.getLogger(__name__)

Step = tuple[str, Callable[[], Any]]  # (key, a blocking call for the model thread)
TOKENS_1024 = 4096


def caption_buckets_up_to(max_caption_tokens: int) -> list[int]:
    """Every bucket a caption of up to `max_caption_tokens` tokens runs at."""
    return list(range(SEQ_MULTI_OF, caption_bucket(max_caption_tokens) + 1, SEQ_MULTI_OF))


def image_sequence(width: int, height: int) -> int:
    """An image's tokens as the DiT runs them (padded to a multiple of 32, as its captions)."""
    return caption_bucket(image_tokens(width, height))


def graph_calls(sizes: Iterable[tuple[int, int]], buckets: Sequence[int], lora_rank: int = 0,
                control: bool = False) -> list[WarmupCall]:
    """One batch-1 call per (size, caption bucket), smallest size first; with `lora_rank`, each also
    with adapters of that rank (keyed `.../lora`) after all those without; with `control`, each also
    controlled (keyed `.../control`) after those."""
    plain = [WarmupCall(f"{w}x{h}/graph/cap{b}", w, h, (b,))
             for w, h in sorted(set(sizes), key=lambda s: image_tokens(*s)) for b in buckets]
    with_lora = [replace(c, key=f"{c.key}/lora", lora_rank=lora_rank) for c in plain] if lora_rank else []
    controlled = [replace(c, key=f"{c.key}/control", control="control") for c in plain] if control else []
    return plain + with_lora + controlled


def size_calls(sizes: Iterable[tuple[int, int]], buckets: Sequence[int], warm_sizes: Iterable[tuple[int, int]] = (),
               caption_len: int = 160, all_buckets_up_to: int = TOKENS_1024) -> list[WarmupCall]:
    """Batch-1 forwards at `sizes` the warm-up (`warm_sizes`, every bucket) has not run: one per size
    (at `caption_len`'s bucket, or a bucket that adds a sequence length), and, for sizes of at most
    `all_buckets_up_to` image tokens, one per main-layer sequence length not run yet. Cheapest first."""
    warm_sizes = set(warm_sizes)
    done: set[int] = set()  # sequence lengths some attention has run at
    for width, height in warm_sizes:
        tokens = image_sequence(width, height)
        done |= {tokens, *(tokens + b for b in buckets)}
    typical = min((b for b in buckets if b >= caption_len), default=buckets[-1])
    calls = []
    for width, height in sorted(set(sizes) - warm_sizes, key=lambda s: (image_tokens(*s), s)):
        tokens = image_sequence(width, height)
        wanted = list(buckets) if tokens <= all_buckets_up_to else [typical]
        new = [b for b in wanted if tokens + b not in done] or [typical]
        for bucket in new:
            calls.append(WarmupCall(f"{width}x{height}/b1/cap{bucket}", width, height, (bucket,)))
            done |= {tokens, tokens + bucket}
    return calls


@torch.inference_mode()
def prepare_graph(graphs, transformer: nn.Module, call: WarmupCall) -> bool:
    """The graph of `call`'s shape, made ahead of any request (`GraphedTransformerFn.prepare`); a
    controlled call's inputs come from the graphs' ControlNet runner."""
    controls = graphs.control.warmup_controls(call) if call.control else None
    return graphs.prepare(*call_inputs(transformer, call), lora=bool(call.lora_rank), controls=controls)


def after_ready_steps(transformer: nn.Module, graphs, graph_sizes: Sequence[tuple[int, int]],
                      sizes: Iterable[tuple[int, int]], covered_sizes: Iterable[tuple[int, int]],
                      max_caption_tokens: int, lora_graphs: bool = False, control=None,
                      control_calls: Sequence[WarmupCall] = ()) -> list[Step]:
    """The graphs of every caption bucket at `graph_sizes` (when `graphs`, a `GraphedTransformerFn`,
    is given; with `lora_graphs`, also those of forwards with adapters; with `graphs.control`, also
    controlled ones), then the forwards of `size_calls` for `sizes` beyond `covered_sizes` (those the
    start-up warm-up or the graphs' first forwards run at every bucket), then `control_calls` (the
    ControlNet's, run through `control`) but those a controlled graph's first forward ran."""
    buckets = caption_buckets_up_to(max_caption_tokens)
    steps: list[Step] = []
    covered = set(covered_sizes)
    graphed: set[tuple[int, int, int]] = set()  # (width, height, bucket) of the controlled graphs
    if graphs is not None:
        calls = graph_calls(graph_sizes, buckets, graphs.lora_rank if lora_graphs else 0, graphs.control is not None)
        if len(calls) > graphs.max_graphs:
            logger.warning("%d caption-bucket graphs at the warm-up sizes, over the %d held; capturing the "
                           "first %d", len(calls), graphs.max_graphs, graphs.max_graphs)
            calls = calls[: graphs.max_graphs]
        steps += [(call.key, partial(prepare_graph, graphs, transformer, call)) for call in calls]
        sizes_run = [(call.width, call.height) for call in calls if not call.lora_rank and not call.control]
        covered |= {size for size in sizes_run if sizes_run.count(size) == len(buckets)}
        graphed = {(c.width, c.height, c.caption_lens[0]) for c in calls if c.control}
    calls = size_calls(sizes, buckets, covered)
    steps += [(call.key, partial(run_call, transformer, call)) for call in calls]
    left = [call for call in control_calls
            if call.batch > 1 or (call.width, call.height, caption_bucket(call.caption_lens[0])) not in graphed]
    return steps + [(call.key, partial(run_call, transformer, call, control=control)) for call in left]
