"""Where a start goes: from `serve run` to the application's ready, and from each replica's request by
the Serve controller to its ready, read from the lines `serve run` prints as they arrive.

`TimedOutput` keeps each line of a `serve run` process with the seconds since it was launched (run
it with PYTHONUNBUFFERED=1, so lines arrive when printed; Ray forwards replicas' log lines to it
within about a second). `budget(lines)` then finds:
- the milestones of the application, in the order they happened: the CLI's start (Python and Ray's
  CLI imports), the application imported and built (the builder's "built in" line; in a Serve
  config file's start the controller builds it), Ray started, the Serve controller started, the
  replicas requested ("Adding 1 replica"), the last replica ready, the application ready;
- per model stage (its "<Stage> ready: ... (seconds: ...)" line, `runtime.stage`): from the
  controller's request to the worker process's start (Ray scheduling and starting a worker), from
  there to the constructor (Ray's worker and Serve's replica setting up, importing the stage's
  module), then the stage's start phases (imports, load, optimize, compile of which dynamo, warm-up).
`format_budget` prints both tables; the JSON is `budget`'s dict.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
MILESTONES = (  # (name, pattern): the first line matching each
    ("CLI started", re.compile(r"Running (?:import path|config file)")),
    ("application imported and built", re.compile(r"zimage-serve application built in (?P<build>[\d.]+) s")),
    ("Ray started", re.compile(r"Started a local Ray instance|Connected to Ray cluster")),
    ("Serve controller started", re.compile(r"Started Serve in namespace")),
    ("replicas requested", re.compile(r"Adding \d+ replicas? to Deployment")),
    ("application ready", re.compile(r"Application '[^']+' is ready at")),
)
ADDING = re.compile(r"Adding \d+ replicas? to Deployment\(name='(?P<stage>\w+)'")
READY = re.compile(r"\b(?P<stage>TextEncoder|Denoiser|VaeDecoder|PromptStyler) ready: .*\(seconds: (?P<seconds>[^;)]*)")
PHASES = ("imports", "load", "random_init", "optimize", "compile", "compile_dynamo", "warmup")


@dataclass
class TimedOutput:
    """Lines of a process's output with their arrival, in seconds since `started` (time.time())."""

    started: float
    lines: list[tuple[float, str]] = field(default_factory=list)

    def follow(self, stream: Iterable[str], log: Path | None = None) -> threading.Thread:
        """Reads `stream` to its end in a thread, keeping each line (and writing it to `log`)."""
        def read() -> None:
            with open(log, "w") if log else contextlib.nullcontext() as out:
                for line in stream:
                    self.lines.append((time.time() - self.started, line))
                    if out is not None:
                        out.write(line)
                        out.flush()

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        return thread


def _seconds(text: str) -> dict[str, float]:
    """`imports_s=45.3 load_s=0.2 ...` to {"imports": 45.3, "load": 0.2, ...}."""
    found = {}
    for item in text.split():
        name, _, value = item.partition("=")
        if name.endswith("_s"):
            found[name.removesuffix("_s")] = float(value)
    return found


def budget(lines: Iterable[tuple[float, str]]) -> dict:
    """The milestones and each model stage's start, from a start's timed lines (see the module)."""
    milestones: dict[str, float] = {}
    build_s = None
    requested: dict[str, float] = {}
    replicas: dict[str, dict] = {}
    for at, raw in lines:
        line = ANSI.sub("", raw)
        for name, pattern in MILESTONES:
            match = pattern.search(line)
            if match and name not in milestones:
                milestones[name] = at
                build_s = float(match["build"]) if "build" in pattern.groupindex else build_s
        if (match := ADDING.search(line)) and match["stage"] not in requested:
            requested[match["stage"]] = at
        if (match := READY.search(line)) and match["stage"] not in replicas:
            replicas[match["stage"]] = {"ready_at": at, **_seconds(match["seconds"])}
    if replicas:
        milestones["last replica ready"] = max(r["ready_at"] for r in replicas.values())
    order = sorted(milestones.items(), key=lambda item: item[1])
    app, previous = [], 0.0
    for name, at in order:
        app.append({"step": name, "at_s": round(at, 1), "took_s": round(at - previous, 1)})
        previous = at
    if build_s is not None:
        app.append({"step": "of which build_app", "at_s": None, "took_s": build_s})
    return {"app": app, "replicas": {stage: replica_row(seen, requested.get(stage)) for stage, seen in replicas.items()}}


def replica_row(seen: dict[str, float], requested_at: float | None) -> dict:
    """One replica's start: `seen` is its ready time (`ready_at`) and its start phases in seconds by
    name (`process`, `ready`, `imports`, ...), `requested_at` when the controller asked for it, both on
    one clock (seconds since the start, or wall-clock)."""
    row = {"requested_at_s": _round(requested_at), "ready_at_s": _round(seen["ready_at"])}
    process_started = seen["ready_at"] - seen["process"] if seen.get("process") is not None else None
    if requested_at is not None and process_started is not None:
        # a negative figure: Ray handed the replica a worker process it had started earlier
        row["request_to_process_s"] = round(process_started - requested_at, 1)
    if seen.get("process") is not None and seen.get("ready") is not None:
        row["process_to_constructor_s"] = round(seen["process"] - seen["ready"], 1)
    row.update({f"{phase}_s": seen.get(phase, 0.0) for phase in PHASES})
    row["constructor_to_ready_s"] = seen.get("ready")
    if requested_at is not None:
        row["request_to_ready_s"] = round(seen["ready_at"] - requested_at, 1)
    return row


def replica_rows_from_stats(stats: dict[str, dict], replica_started: dict[str, float]) -> dict[str, dict]:
    """`replica_row` from each stage's `stats()` (`start_phases`, `ready_at`) and the wall-clock time
    the controller started each stage's replica (Serve's replica details, `start_time_s`)."""
    rows = {}
    for stage, data in stats.items():
        if data.get("ready_at") is None:
            continue
        seen = {"ready_at": data["ready_at"], **{k.removesuffix("_s"): v for k, v in data["start_phases"].items()}}
        row = rows[stage] = replica_row(seen, replica_started.get(stage))
        del row["requested_at_s"], row["ready_at_s"]  # wall-clock times: not for a table
    return rows


def replica_start_times(app: str) -> dict[str, float]:
    """Wall-clock time the Serve controller started each deployment's (first) replica actor, from
    Serve's own details of the running instance (call where Ray and Serve are connected)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployments = details.get("applications", {}).get(app, {}).get("deployments", {})
    return {name: min(r["start_time_s"] for r in d.get("replicas", [])) for name, d in deployments.items()
            if d.get("replicas")}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def format_budget(result: dict) -> str:
    """Both tables as text (Markdown pipes, so they paste into RESULTS.md)."""
    return format_app(result["app"]) + "\n\n" + format_replicas(result["replicas"])


def format_app(rows: list[dict]) -> str:
    out = ["| step | at s | took s |", "| --- | ---: | ---: |"]
    for row in rows:
        at = "" if row["at_s"] is None else f"{row['at_s']:.1f}"
        out.append(f"| {row['step']} | {at} | {row['took_s']:.1f} |")
    return "\n".join(out)


def format_replicas(rows: dict[str, dict]) -> str:
    columns = ["request_to_process_s", "process_to_constructor_s", *(f"{p}_s" for p in PHASES),
               "constructor_to_ready_s", "request_to_ready_s"]
    names = ["request to process", "process to constructor", "imports", "load", "random init", "optimize",
             "compile", "of which dynamo", "warm-up", "constructor to ready", "request to ready"]
    out = ["| replica | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for stage, row in rows.items():
        cells = ["" if row.get(c) is None else f"{row[c]:.1f}" for c in columns]
        out.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(out)
