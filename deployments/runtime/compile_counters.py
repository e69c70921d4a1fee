"""What torch.compile has done in this process so far, read from torch's own counters.

A start from a filled compile cache should show FX-graph cache hits and no misses (nothing compiled
by inductor) and spend its compile time in dynamo, which traces every graph again whatever the
cache holds. `CompileCounts.read()` takes a snapshot; the difference of two snapshots is what ran
between them (`after - before`). Counters are process-wide: a replica is one process per stage.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class CompileCounts:
    fx_hits: int = 0
    """Inductor graphs loaded from its FX-graph cache (torch._dynamo.utils.counters["inductor"])."""
    fx_misses: int = 0
    """Inductor graphs compiled (lowered, code generated, kernels built): what a filled cache avoids."""
    aot_hits: int = 0
    aot_misses: int = 0
    """AOTAutograd's cache of the traced graphs (counters["aot_autograd"])."""
    frames: int = 0
    """Frames dynamo compiled (each one traced, whether its graph then came from a cache or not)."""
    compile_s: float = 0.0
    """torch.compile's seconds (`_compile.compile_inner`): dynamo, then the backend."""
    backend_s: float = 0.0
    """Of which the backend (`OutputGraph.call_user_compiler`): AOTAutograd and inductor, cache loads included."""

    @property
    def dynamo_s(self) -> float:
        """Dynamo's own seconds: tracing bytecode into graphs and building guards, which no cache of
        compiled code saves (only ahead-of-time packages would)."""
        return max(0.0, self.compile_s - self.backend_s)

    @classmethod
    def read(cls) -> CompileCounts:
        """The counts now; all zero in a process that never imported dynamo (nothing compiled)."""
        if "torch._dynamo" not in sys.modules:
            return cls()
        from torch._dynamo.utils import compilation_time_metrics, counters

        inductor, aot = counters["inductor"], counters["aot_autograd"]
        seconds = {key: float(sum(compilation_time_metrics.get(key, ())))
                   for key in ("_compile.compile_inner", "OutputGraph.call_user_compiler")}
        return cls(fx_hits=inductor["fxgraph_cache_hit"], fx_misses=inductor["fxgraph_cache_miss"],
                   aot_hits=aot["autograd_cache_hit"], aot_misses=aot["autograd_cache_miss"],
                   frames=counters["stats"]["unique_graphs"], compile_s=seconds["_compile.compile_inner"],
                   backend_s=seconds["OutputGraph.call_user_compiler"])

    def __sub__(self, other: CompileCounts) -> CompileCounts:
        return CompileCounts(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    @property
    def compiled_anything(self) -> bool:
        """Whether inductor or AOTAutograd made something no cache had (a cache written now adds it)."""
        return self.fx_misses > 0 or self.aot_misses > 0

    def as_dict(self) -> dict[str, float]:
        return {**{f.name: round(getattr(self, f.name), 3) if isinstance(getattr(self, f.name), float)
                   else getattr(self, f.name) for f in fields(self)}, "dynamo_s": round(self.dynamo_s, 3)}
