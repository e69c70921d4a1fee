"""The DiT forward replayed from CUDA graphs, so that a host-bound step runs at its kernels' speed.

Why: a 512x512 step of the fused FP8 path launches a few hundred kernels and ops from Python: about
31.2 ms of host time against 15.6 ms of GPU time on an H200 (RESULTS.md, round of 2026-12-01,
`profile_512.json`), so the GPU waits
on the host. A CUDA graph replays all of a forward's kernels with one launch.

One graph per call shape: the images' latent shapes and, given `padded` (what the Denoiser gives),
the captions' buckets (`caption_buckets`: diffusers runs a caption of L tokens as L rounded up to a
multiple of 32 anyway, and which rows are padding is a mask, i.e. data): a graph captured for a
bucket replays every caption length in it, and the warm-up captures every bucket up front.
Without `padded`, the captions' exact lengths. Only forwards of up to `max_batch` images (default
1): a busy replica's ragged batches seldom repeat a shape, and several images make a step GPU-bound.

When: the first forward of a shape runs as usual: it makes cuDNN's plans and any other lazy state,
which cannot be made inside a capture. The second captures (recording only, on a side stream) and
replays. So a request's 8 steps at a new shape are one plain forward, one capture and replays;
`prepare` does the first two ahead of any request. The graphs share one memory pool: they never
run at once, and each output is copied out right after its replay; `as_dict()["graph_pool_mib"]`
is what the captures added to the memory the process holds. Past `max_graphs` the least recently
used graph is dropped.

A capture that fails is logged and counted (`stats["capture_failures"]`) and its shape runs as a
plain forward from then on: the request is still served, at the ungraphed speed.

LoRA: a one-image forward with adapters (`lora.slots`: the factors of the forward in flight,
`LoraSlots.active`) replays a graph of its own per shape, captured on static factor buffers of up to
`lora_rank` (`GraphFactors`, made at the first such capture): a replay first copies the forward's
factors in, zero-padded, and only when they are not the ones copied last (a job's 8 steps copy once;
on FP8 linears A and its scales go into the weights' tails, which are the static buffers for them).
So a new adapter, a new scale or a new rank up to `lora_rank` replays the same graph. A forward whose
rank is over it, or with several images, runs plain (compiled, its factors read by the update op).

ControlNet: a one-image controlled forward (`denoiser.control`: the control inputs of the forward in
flight, `ControlNetRunner.active`) replays a graph of its own per shape ("control", or "lora+control"
with adapters too), captured on static control inputs made at its capture (`ControlInputs.static`: the
control context `[C_in, 1, h, w]` and the scale): a replay first copies the forward's in, only when
they are not the ones copied last (a job's 8 steps copy once). So any control image, scale or form
(plain control or the inpainting layout: data of the same shape) replays the same graph. Controlled
forwards of several images run plain (compiled), as plain batches do.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from deployments.denoiser.control import ControlContext, ControlInputs, ControlNetRunner
from deployments.denoiser.dit.caption_buckets import PaddedTransformerFn, caption_bucket, pad_caption
from deployments.denoiser.loop import TransformerFn
from deployments.denoiser.lora.graph_factors import GraphFactors
from deployments.denoiser.lora.slots import LoraSlots

logger = logging.getLogger(__name__)

# (latent shapes, caption shapes, the variant: "", "lora", "control" or "lora+control")
ShapeKey = tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...], str]
LORA_GRAPH_RANK = 128  # the static factors' rank: adapters up to it replay graphs
# Records `forward()` and returns (replay, its outputs); `CudaCapture` on a GPU.
Capture = Callable[[Callable[[], list[torch.Tensor]]], tuple[Callable[[], None], list[torch.Tensor]]]


class CudaCapture:
    """Captures into CUDA graphs on a side stream, all in one memory pool (see the module docstring),
    and counts the memory the process reserved for them (`reserved_bytes`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)
        self.reserved_bytes = 0

    def __call__(self, forward: Callable[[], list[torch.Tensor]]) -> tuple[Callable[[], None], list[torch.Tensor]]:
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            # `capture_begin` rather than `torch.cuda.graph`: that one also collects garbage and
            # empties the allocator's cache, tens of milliseconds on a live request's step
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                outputs = forward()
            finally:
                graph.capture_end()
                self.reserved_bytes += max(0, torch.cuda.memory_reserved(self.device) - reserved)
        current.wait_stream(self.stream)
        return graph.replay, outputs


def cuda_capture(device: torch.device) -> CudaCapture:
    return CudaCapture(device)


@dataclass
class _Graph:
    replay: Callable[[], None]
    latents: list[torch.Tensor]  # the static inputs the graph reads
    t: torch.Tensor
    captions: list[torch.Tensor]  # padded to their buckets when bucketed
    outputs: list[torch.Tensor]  # the static outputs it writes
    masks: list[torch.Tensor] = field(default_factory=list)  # bucketed: each caption's pad rows
    rows: list[torch.Tensor] = field(default_factory=list)  # bucketed: 0..B-1 per caption, for the masks
    control: ControlInputs | None = None  # controlled: the static control inputs it reads


class GraphedTransformerFn:
    """A `TransformerFn` that replays forwards of up to `max_batch` images from CUDA graphs; with
    `padded` (`caption_buckets.padded_transformer_fn`), one graph per caption bucket."""

    def __init__(self, fn: TransformerFn, capture: Capture, max_batch: int = 1, max_graphs: int = 96,
                 padded: PaddedTransformerFn | None = None, lora: LoraSlots | None = None,
                 lora_rank: int = LORA_GRAPH_RANK, control: ControlNetRunner | None = None):
        if max_batch < 1 or max_graphs < 1:
            raise ValueError("max_batch and max_graphs must be at least 1")
        self.fn = fn
        self.padded = padded
        self.capture = capture
        self.max_batch = max_batch
        self.max_graphs = max_graphs
        self.lora = lora
        self.lora_rank = lora_rank
        self.lora_factors: GraphFactors | None = None  # made at the first capture with adapters
        self.control = control
        self._graphs: OrderedDict[ShapeKey, _Graph] = OrderedDict()
        self._seen: OrderedDict[ShapeKey, None] = OrderedDict()  # shapes run once, not captured yet
        self._failed: set[ShapeKey] = set()
        self.stats = {"plain": 0, "captures": 0, "replays": 0, "evicted": 0, "capture_failures": 0}
        self.pool_bytes: dict[str, int] = {}  # graph memory the captures of each variant added

    @classmethod
    def on(cls, fn: TransformerFn, device: torch.device, **kwargs) -> GraphedTransformerFn:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        return cls(fn, cuda_capture(device), **kwargs)

    @property
    def bucketed(self) -> bool:
        return self.padded is not None

    def shape_key(self, latents: list[torch.Tensor], captions: list[torch.Tensor], variant: str = "") -> ShapeKey:
        lengths = [c.shape[0] for c in captions]
        if self.bucketed:
            lengths = [caption_bucket(n) for n in lengths]
        return (tuple(tuple(x.shape) for x in latents),
                tuple((n, *c.shape[1:]) for n, c in zip(lengths, captions)), variant)

    def _variant(self) -> str | None:
        """The forward's graph variant: "lora" with adapters that a graph can take, "control" while it is
        controlled over every row, both joined by "+", "" for neither; None for adapters it cannot take
        (several images, or a rank over `lora_rank`) or control over some of its rows only."""
        parts = []
        active = None if self.lora is None else self.lora.active
        if active is not None:
            if active.groups.shape[0] > 1 or active.rank > self.lora_rank:
                return None
            self._static_factors().fill(active)
            parts.append("lora")
        control = None if self.control is None else self.control.active
        if control is not None:
            if control.rows is not None:
                return None
            parts.append("control")
        return "+".join(parts)

    def _static_factors(self) -> GraphFactors:
        if self.lora_factors is None:
            self.lora_factors = GraphFactors(self.lora, self.lora_rank)
        return self.lora_factors

    def __call__(self, latents: list[torch.Tensor], t: torch.Tensor,
                 captions: list[torch.Tensor]) -> list[torch.Tensor]:
        variant = self._variant() if len(latents) <= self.max_batch else None
        key = self.shape_key(latents, captions, variant or "")
        if variant is None or key in self._failed:
            return self._plain(latents, t, captions)
        graph = self._graphs.get(key)
        if graph is None:
            if key not in self._seen:  # first sight: plans and lazy state are made here, not in a capture
                self._remember(key)
                return self._first_sight(key, latents, t, captions)
            graph = self._capture(key, latents, t, captions)
            if graph is None:
                return self._plain(latents, t, captions)
        self._graphs.move_to_end(key)
        self._fill(graph, latents, t, captions)
        graph.replay()
        self.stats["replays"] += 1
        return [out.clone() for out in graph.outputs]

    def prepare(self, latents: list[torch.Tensor], t: torch.Tensor, captions: list[torch.Tensor],
                lora: bool = False, controls: list[ControlContext | None] | None = None) -> bool:
        """Makes the graph for this call's shape ahead of a request (a plain forward first if the
        shape was not run yet, then the capture), without replaying it; whether a graph is held.
        `lora`: the graph of forwards with adapters (on zero factors); `controls`: of controlled ones."""
        if controls is not None:
            if self.control is None:
                raise ValueError("no ControlNet is loaded")
            with self.control.using(controls):
                return self.prepare(latents, t, captions, lora=lora)
        if lora:
            if self.lora is None:
                raise ValueError("this transformer carries no adapters")
            with self.lora.applied(self._static_factors().factors):
                return self.prepare(latents, t, captions)
        variant = self._variant() if len(latents) <= self.max_batch else None
        key = self.shape_key(latents, captions, variant or "")
        if variant is None or key in self._failed:
            return False
        if key in self._graphs:
            return True
        if key not in self._seen:
            self._remember(key)
            self._first_sight(key, latents, t, captions)
        return self._capture(key, latents, t, captions) is not None

    def graph_count(self) -> int:
        return len(self._graphs)

    def summary(self) -> str:
        """`as_dict`'s graphs and their memory in one sentence (the Denoiser's log line once they are made)."""
        g = self.as_dict()
        return (f"{g['graphs']} held (one per size and caption bucket; {g['lora_graphs']} with LoRA adapters, "
                f"{g['control_graphs']} controlled), {g['graph_pool_mib']} MiB of graph memory "
                f"({g['lora_graph_pool_mib']} with adapters, plus {g['lora_factors_mib']} MiB of their static factors; "
                f"{g['control_graph_pool_mib']} controlled, plus {g['control_inputs_mib']} MiB of their static inputs)")

    def as_dict(self) -> dict:
        """The counters, the graphs held now and their memory (the Denoiser's stats, the benchmark's JSON):
        `graph_pool_mib` all captures added, `lora_graph_pool_mib` the part the graphs with adapters
        added, `lora_factors_mib` their static factors, `control_graph_pool_mib` the part the controlled
        graphs added (a graph with both counts in both), `control_inputs_mib` their static inputs."""
        reserved = getattr(self.capture, "reserved_bytes", None)
        mib = lambda n: None if reserved is None else round(n / 2**20, 1)  # noqa: E731

        def of(part: str) -> tuple[int, int]:  # graphs held, and the pool bytes their variant's captures added
            return (sum(1 for key in self._graphs if part in key[2].split("+")),
                    sum(n for variant, n in self.pool_bytes.items() if part in variant.split("+")))

        (lora_graphs, lora_bytes), (control_graphs, control_bytes) = of("lora"), of("control")
        inputs = sum(t.nbytes for graph in self._graphs.values() if graph.control is not None
                     for t in graph.control.contexts + [graph.control.scales])
        return {**self.stats, "graphs": self.graph_count(), "bucketed": self.bucketed,
                "graph_pool_mib": mib(reserved or 0),
                "lora_graphs": lora_graphs, "lora_graph_pool_mib": mib(lora_bytes),
                "lora_factors_mib": round((self.lora_factors.nbytes if self.lora_factors else 0) / 2**20, 1),
                "lora_rank": self.lora_rank,
                "control_graphs": control_graphs, "control_graph_pool_mib": mib(control_bytes),
                "control_inputs_mib": round(inputs / 2**20, 1)}

    def _plain(self, latents, t, captions) -> list[torch.Tensor]:
        self.stats["plain"] += 1
        return self.fn(latents, t, captions)

    def _on_static_factors(self, key: ShapeKey, control: ControlInputs | None = None) -> contextlib.ExitStack:
        """With adapters (`key`'s variant), the static factors set on the linears for the call; with
        `control`, those control inputs in effect."""
        stack = contextlib.ExitStack()
        if "lora" in key[2].split("+"):
            stack.enter_context(self.lora.applied(self.lora_factors.factors))
        if control is not None:
            stack.enter_context(self.control.applied(control))
        return stack

    def _first_sight(self, key: ShapeKey, latents, t, captions) -> list[torch.Tensor]:
        """A plain forward along the path the graph will record (bucketed: the padded captions; with
        adapters: the static factors)."""
        with self._on_static_factors(key):
            if not self.bucketed:
                return self._plain(latents, t, captions)
            self.stats["plain"] += 1
            pairs = [pad_caption(c) for c in captions]
            return self.padded(latents, t, [p for p, _ in pairs], [m for _, m in pairs])

    def _fill(self, graph: _Graph, latents, t, captions) -> None:
        for static, value in zip(graph.latents + [graph.t], latents + [t]):
            static.copy_(value)
        if graph.control is not None:
            graph.control.fill(self.control.active)
        if not self.bucketed:
            for static, value in zip(graph.captions, captions):
                static.copy_(value)
            return
        for static, mask, rows, value in zip(graph.captions, graph.masks, graph.rows, captions):
            length = value.shape[0]
            static[:length].copy_(value)
            if length < static.shape[0]:  # the last row repeated, as diffusers pads
                static[length:].copy_(value[-1:].expand(static.shape[0] - length, -1))
            torch.ge(rows, length, out=mask)

    def _remember(self, key: ShapeKey) -> None:
        self._seen[key] = None
        while len(self._seen) > 4 * self.max_graphs:
            self._seen.popitem(last=False)

    def _capture(self, key: ShapeKey, latents, t, captions) -> _Graph | None:
        static_latents = [x.clone() for x in latents]
        static_t = t.clone()
        if self.bucketed:
            pairs = [pad_caption(c) for c in captions]
            static_captions = [p.clone() for p, _ in pairs]
            masks = [m.clone() for _, m in pairs]
            rows = [torch.arange(m.shape[0], device=m.device) for m in masks]
            run = lambda: self.padded(static_latents, static_t, static_captions, masks)  # noqa: E731
        else:
            static_captions, masks, rows = [c.clone() for c in captions], [], []
            run = lambda: self.fn(static_latents, static_t, static_captions)  # noqa: E731
        reserved = getattr(self.capture, "reserved_bytes", 0)
        control = self.control.active.static() if "control" in key[2].split("+") else None
        try:
            with self._on_static_factors(key, control):
                replay, outputs = self.capture(run)
        except Exception:  # noqa: BLE001 - served plain from now on, and said so
            self._failed.add(key)
            self.stats["capture_failures"] += 1
            logger.exception("CUDA graph capture failed for shape %s; it runs as plain forwards", key)
            return None
        self._seen.pop(key, None)
        self.stats["captures"] += 1
        self.pool_bytes[key[2]] = self.pool_bytes.get(key[2], 0) + getattr(self.capture, "reserved_bytes", 0) - reserved
        graph = _Graph(replay, static_latents, static_t, static_captions, list(outputs), masks, rows, control)
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            dropped, _ = self._graphs.popitem(last=False)
            self._remember(dropped)  # a shape seen before: captured again at its next forward
            self.stats["evicted"] += 1
        return graph
