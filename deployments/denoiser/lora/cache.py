"""A replica's resident adapters: read, converted and laid out on the model's device once, kept in an
LRU bounded in bytes (`lora_cache_bytes`, live config), and loaded in a worker thread, off the step loop.

A request's adapters are resolved before its job joins the step batch; a job holds references to its
adapters' tensors, so an eviction never pulls factors from under a running job (their memory is freed
when the last such job ends). A file replaced on disk is another version and is read again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from deployments.contracts import LoraRef
from deployments.denoiser.lora.errors import LoraUnsupportedError
from deployments.denoiser.lora.layout import LaidOutAdapter
from deployments.denoiser.lora.library import LoraLibrary
from deployments.denoiser.lora.slots import LoraSlots
from deployments.runtime.metrics import counter, gauge

logger = logging.getLogger("ray.serve")


@dataclass
class CacheCounts:
    loads: int = 0
    load_seconds: float = 0.0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    resident_bytes: int = 0
    resident: int = 0


class LoraMetrics:
    def __init__(self) -> None:
        self.loads = counter("zimage_lora_loads", "LoRA adapters read, converted and placed on the device.")
        self.load_seconds = counter("zimage_lora_load_seconds", "Seconds spent loading LoRA adapters.")
        self.hits = counter("zimage_lora_cache_hits", "Adapter lookups served from the replica's cache.")
        self.misses = counter("zimage_lora_cache_misses", "Adapter lookups that had to load the file.")
        self.evictions = counter("zimage_lora_cache_evictions", "Adapters evicted from the replica's cache.")
        self.resident_bytes = gauge("zimage_lora_resident_bytes", "Bytes of LoRA factors resident on the replica.")


class AdapterCache:
    def __init__(self, library: LoraLibrary, slots: LoraSlots | None, capacity_bytes: int):
        self.library = library
        self.slots = slots
        self.capacity_bytes = capacity_bytes
        self.counts = CacheCounts()
        self.metrics = LoraMetrics()
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, LaidOutAdapter] = OrderedDict()

    def resolve(self, refs: Sequence[LoraRef]) -> tuple[tuple[LaidOutAdapter, float], ...]:
        """The request's adapters laid out on the device, with their scales (blocking: file reads)."""
        if not refs:
            return ()
        if self.slots is None:
            raise LoraUnsupportedError("loras: this replica's DiT was built without adapter support")
        adapters = [self._get(ref.name) for ref in refs]
        self._evict(keep={id(a) for a in adapters})
        return tuple((adapter, float(ref.scale)) for adapter, ref in zip(adapters, refs))

    async def resolve_async(self, refs: Sequence[LoraRef]) -> tuple[tuple[LaidOutAdapter, float], ...]:
        return await asyncio.to_thread(self.resolve, refs) if refs else ()

    def _get(self, name: str) -> LaidOutAdapter:
        start = time.perf_counter()  # a miss's seconds include a hub alias's first fetch
        key = self.library.file(name).version
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.counts.hits += 1
                self.metrics.hits.inc()
                return found
        self.counts.misses += 1
        self.metrics.misses.inc()
        adapter, entry = self.library.load(name)
        laid = self.slots.lay_out(adapter)
        seconds = time.perf_counter() - start
        with self._lock:
            self._entries[entry.version] = laid
            self.counts.loads += 1
            self.counts.load_seconds += seconds
        self.metrics.loads.inc()
        self.metrics.load_seconds.inc(seconds)
        logger.info("LoRA %r loaded in %.2fs (%d bytes on %s)", name, seconds, laid.nbytes, self.slots.device)
        return laid

    def _evict(self, keep: set[int]) -> None:
        """Least recently used first, down to the capacity; never the adapters of the request at hand."""
        with self._lock:
            for key in list(self._entries):
                if self._resident_bytes() <= self.capacity_bytes:
                    break
                if id(self._entries[key]) in keep:
                    continue
                del self._entries[key]
                self.counts.evictions += 1
                self.metrics.evictions.inc()
                self.slots.forget()
            self.counts.resident_bytes = self._resident_bytes()
            self.counts.resident = len(self._entries)
        self.metrics.resident_bytes.set(self.counts.resident_bytes)

    def _resident_bytes(self) -> int:
        return sum(a.nbytes for a in self._entries.values())

    def resident_names(self) -> list[str]:
        with self._lock:
            return [a.name for a in self._entries.values()]

    def stats(self) -> dict:
        return {**asdict(self.counts), "capacity_bytes": self.capacity_bytes, "names": self.resident_names()}
