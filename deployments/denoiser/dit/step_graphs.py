"""The DiT forward replayed from CUDA graphs, so that a host-bound step runs at its kernels' speed.

Why: a 512x512 step of the fused FP8 path launches a few hundred kernels and ops from Python: about
31 ms of host time against 15.6 ms of GPU time on an H200 (benchmarks/RESULTS.md), so the GPU waits
on the host. A CUDA graph replays all of a forward's kernels with one launch.

One graph per call shape: the images' latent shapes and the captions' exact lengths. diffusers
builds the caption padding and the position ids from the lengths in Python, so a graph is only
valid for the lengths it was captured with (padding captions to a bucket ourselves would change
what the model computes). Only forwards of up to `max_batch` images (default 1): a busy replica's
ragged batches seldom repeat a shape, and several images make a step GPU-bound anyway.

When: the first forward of a shape runs as usual: it makes cuDNN's plans and any other lazy state,
which cannot be made inside a capture. The second captures (recording only, on a side stream) and
replays. So a request's 8 steps at a new caption length are one plain forward, one capture and
replays. The graphs share one memory pool: they never run at once, and each output is copied out
right after its replay. Past `max_graphs` the least recently used graph is dropped.

A capture that fails is logged and counted (`stats["capture_failures"]`) and its shape runs as a
plain forward from then on: the request is still served, at the ungraphed speed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deployments.denoiser.loop import TransformerFn

logger = logging.getLogger(__name__)

ShapeKey = tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]
# Records `forward()` and returns (replay, its outputs); `cuda_capture` on a GPU.
Capture = Callable[[Callable[[], list[torch.Tensor]]], tuple[Callable[[], None], list[torch.Tensor]]]


def cuda_capture(device: torch.device) -> Capture:
    """Capture into CUDA graphs on a side stream, all in one memory pool (see the module docstring)."""
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(device)

    def capture(forward: Callable[[], list[torch.Tensor]]) -> tuple[Callable[[], None], list[torch.Tensor]]:
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            # `capture_begin` rather than `torch.cuda.graph`: that one also collects garbage and
            # empties the allocator's cache, tens of milliseconds on a live request's step
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                outputs = forward()
            finally:
                graph.capture_end()
        current.wait_stream(stream)
        return graph.replay, outputs

    return capture


@dataclass
class _Graph:
    replay: Callable[[], None]
    latents: list[torch.Tensor]  # the static inputs the graph reads
    t: torch.Tensor
    captions: list[torch.Tensor]
    outputs: list[torch.Tensor]  # the static outputs it writes


class GraphedTransformerFn:
    """A `TransformerFn` that replays forwards of up to `max_batch` images from CUDA graphs."""

    def __init__(self, fn: TransformerFn, capture: Capture, max_batch: int = 1, max_graphs: int = 64):
        if max_batch < 1 or max_graphs < 1:
            raise ValueError("max_batch and max_graphs must be at least 1")
        self.fn = fn
        self.capture = capture
        self.max_batch = max_batch
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[ShapeKey, _Graph] = OrderedDict()
        self._seen: OrderedDict[ShapeKey, None] = OrderedDict()  # shapes run once, not captured yet
        self._failed: set[ShapeKey] = set()
        self.stats = {"plain": 0, "captures": 0, "replays": 0, "evicted": 0, "capture_failures": 0}

    @classmethod
    def on(cls, fn: TransformerFn, device: torch.device, **kwargs) -> GraphedTransformerFn:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        return cls(fn, cuda_capture(device), **kwargs)

    @staticmethod
    def shape_key(latents: list[torch.Tensor], captions: list[torch.Tensor]) -> ShapeKey:
        return tuple(tuple(x.shape) for x in latents), tuple(tuple(c.shape) for c in captions)

    def __call__(self, latents: list[torch.Tensor], t: torch.Tensor,
                 captions: list[torch.Tensor]) -> list[torch.Tensor]:
        key = self.shape_key(latents, captions)
        if len(latents) > self.max_batch or key in self._failed:
            return self._plain(latents, t, captions)
        graph = self._graphs.get(key)
        if graph is None:
            if key not in self._seen:  # first sight: plans and lazy state are made here, not in a capture
                self._remember(key)
                return self._plain(latents, t, captions)
            graph = self._capture(key, latents, t, captions)
            if graph is None:
                return self._plain(latents, t, captions)
        self._graphs.move_to_end(key)
        for static, value in zip(graph.latents + [graph.t] + graph.captions, latents + [t] + captions):
            static.copy_(value)
        graph.replay()
        self.stats["replays"] += 1
        return [out.clone() for out in graph.outputs]

    def graph_count(self) -> int:
        return len(self._graphs)

    def as_dict(self) -> dict[str, int]:
        """The counters and the graphs held now (the Denoiser's stats, the benchmark's JSON)."""
        return {**self.stats, "graphs": self.graph_count()}

    def _plain(self, latents, t, captions) -> list[torch.Tensor]:
        self.stats["plain"] += 1
        return self.fn(latents, t, captions)

    def _remember(self, key: ShapeKey) -> None:
        self._seen[key] = None
        while len(self._seen) > 4 * self.max_graphs:
            self._seen.popitem(last=False)

    def _capture(self, key: ShapeKey, latents, t, captions) -> _Graph | None:
        static_latents = [x.clone() for x in latents]
        static_t = t.clone()
        static_captions = [c.clone() for c in captions]
        try:
            replay, outputs = self.capture(lambda: self.fn(static_latents, static_t, static_captions))
        except Exception:  # noqa: BLE001 - served plain from now on, and said so
            self._failed.add(key)
            self.stats["capture_failures"] += 1
            logger.exception("CUDA graph capture failed for shape %s; it runs as plain forwards", key)
            return None
        self._seen.pop(key, None)
        self.stats["captures"] += 1
        graph = _Graph(replay, static_latents, static_t, static_captions, list(outputs))
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            dropped, _ = self._graphs.popitem(last=False)
            self._remember(dropped)  # a shape seen before: captured again at its next forward
            self.stats["evicted"] += 1
        return graph
