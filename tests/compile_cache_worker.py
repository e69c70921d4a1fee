"""A replica's start, reduced to its compile cache, in a process of its own (torch's caches are
process-wide): configure the cache, load the stage's file, compile and run tiny functions with
inductor (matrix products: inductor calls an extern kernel, so no C++ compiler runs and it takes
seconds on a CPU), save after the "warm-up", and print what happened as one JSON line.

    python -m tests.compile_cache_worker '{"directory": ..., "identity": {...}, "shared": {...},
                                           "functions": ["square", "gram"]}'
"""

from __future__ import annotations

import json
import logging
import sys


FUNCTIONS = {"square": lambda x: x @ x, "gram": lambda x: x @ x.t(), "cube": lambda x: x @ x @ x}


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    spec = json.loads(sys.argv[1])
    recorder = Recorder()
    logging.getLogger("deployments.runtime").addHandler(recorder)
    import torch

    from deployments.runtime.artifact_store import SharedCompileCache
    from deployments.runtime.compile_cache import (
        CompileCache,
        compile_cache_status,
        configure_compile_cache,
        load_compile_artifacts,
        save_compile_artifacts,
        wait_for_uploads,
    )
    from deployments.runtime.compile_counters import CompileCounts

    shared = SharedCompileCache.model_validate(spec["shared"]) if spec.get("shared") else None
    cache = CompileCache(spec["directory"], spec.get("identity", {}), shared)
    configured = configure_compile_cache(cache)
    loaded = load_compile_artifacts(cache, "tiny")
    before = CompileCounts.read()
    written = None
    # a replica's warm-ups: before ready, then after it ("later"), the file written after each
    phases = [spec.get("functions", ["square"])] + ([spec["later"]] if spec.get("later") else [])
    for phase in phases:
        for name in phase:
            result = torch.compile(FUNCTIONS[name], backend="inductor")(torch.eye(8) * 2)
            assert torch.equal(result, FUNCTIONS[name](torch.eye(8) * 2))
        written = save_compile_artifacts(cache, "tiny") or written
    counts = CompileCounts.read() - before
    uploads_ok = wait_for_uploads(60)
    print("RESULT " + json.dumps({
        "configured": configured is not None, "loaded": loaded, "counts": counts.as_dict(),
        "written": None if written is None else str(written), "uploads_ok": uploads_ok,
        "status": compile_cache_status()["tiny"], "file": cache.key("tiny").file_name,
        "warnings": recorder.messages,
    }))


if __name__ == "__main__":
    main()
