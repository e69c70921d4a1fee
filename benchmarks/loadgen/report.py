"""What a load run measured: per-request records, latency statistics, goodput, and the report as a
table and as JSON."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.loadgen.config import LoadConfig


def percentile(values: list[float], q: float) -> float:
    """numpy's default percentile (linear interpolation between closest ranks), q in [0, 100]; NaN for
    no values, so an empty phase still gives a report."""
    if not values:
        return math.nan
    return float(np.percentile(values, q))


@dataclass
class LatencyStats:
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    min_ms: float

    @classmethod
    def of(cls, latencies_ms: list[float]) -> LatencyStats:
        if not latencies_ms:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, nan)
        return cls(
            count=len(latencies_ms),
            p50_ms=percentile(latencies_ms, 50),
            p90_ms=percentile(latencies_ms, 90),
            p99_ms=percentile(latencies_ms, 99),
            mean_ms=sum(latencies_ms) / len(latencies_ms),
            max_ms=max(latencies_ms),
            min_ms=min(latencies_ms),
        )


@dataclass
class RequestRecord:
    """One request. `start_s` is its send time from the start of its phase; latency is send to last byte."""

    index: int
    start_s: float
    latency_ms: float
    size: str
    n: int
    seed: int | None
    status: int | None  # HTTP status; None when no response came (connection error, timeout)
    ok: bool
    images: int
    error: str | None = None  # "http 404: ...", "malformed: ...", or an exception type and message
    error_kind: str | None = None  # the status as text, or the exception type name
    warmup: bool = False
    server_timings: dict[str, float] | None = None  # the 200's `timings` object (ms), when the server sends one
    control: bool = False  # the request carried the control image (`control_fraction`)


def goodput(records: list[RequestRecord], wall_s: float, slo_ms: float | None) -> float:
    """Images per second from requests that succeeded within the SLO (all successes when no SLO)."""
    if wall_s <= 0:
        return 0.0
    good = [r for r in records if r.ok and (slo_ms is None or r.latency_ms <= slo_ms)]
    return sum(r.images for r in good) / wall_s


@dataclass
class LoadReport:
    label: str
    mode: str
    url: str
    started_at: str
    wall_s: float
    sent: int
    ok: int
    failed: int
    dropped: int  # open loop: arrivals not sent because the in-flight cap was reached
    images: int
    requests_per_s: float
    images_per_s: float
    slo_ms: float | None
    within_slo: int
    goodput_images_per_s: float
    latency: LatencyStats
    latency_by_size: dict[str, LatencyStats]
    latency_by_control: dict[str, LatencyStats]  # "control" and "plain" requests, with a control fraction
    server_timings_count: int  # successful requests whose response had a `timings` object
    server_timings_p50_ms: dict[str, float]  # field -> median over those requests, in the server's order
    outside_server_p50_ms: float  # median of (latency - timings.total_ms): NaN without server timings
    errors_by_status: dict[str, int]
    errors_by_exception: dict[str, int]
    error_samples: list[str]
    warmup_sent: int
    warmup_ok: int
    config: dict[str, Any]
    records: list[RequestRecord]

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))

    def write_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def format_table(self) -> str:
        title = f"load report{f' [{self.label}]' if self.label else ''}: {self.mode} loop against {self.url}"
        if self.config.get("concurrency") is not None:
            title += f", concurrency {self.config['concurrency']}"
        else:
            title += f", rate {self.config['rate']}/s (cap {self.config['max_in_flight']} in flight)"
        if self.config.get("fresh_prompts"):
            title += ", fresh prompts"
        if self.config.get("loras"):
            title += f", one of {len(self.config['loras'])} LoRA adapters per request (scale {self.config['lora_scale']:g})"
        if self.config.get("control_fraction"):
            preprocess = self.config.get("control_preprocess")
            title += (f", a control image in {self.config['control_fraction']:.0%} of requests (scale "
                      f"{self.config['control_scale']:g}{', ' + preprocess if preprocess else ''})")
        lines = [title, ""]
        summary = [
            ("wall time", f"{self.wall_s:.2f} s"),
            ("requests sent / ok / failed", f"{self.sent} / {self.ok} / {self.failed}"),
            ("images ok", f"{self.images}"),
            ("requests/s", f"{self.requests_per_s:.3f}"),
            ("images/s", f"{self.images_per_s:.3f}"),
        ]
        if self.dropped:
            summary.insert(2, ("dropped at in-flight cap", f"{self.dropped}"))
        if self.slo_ms is not None:
            summary.append((f"goodput (<= {self.slo_ms:g} ms)", f"{self.goodput_images_per_s:.3f} images/s "
                            f"({self.within_slo}/{self.sent} requests)"))
        if self.warmup_sent:
            summary.append(("warm-up (excluded)", f"{self.warmup_ok}/{self.warmup_sent} ok"))
        width = max(len(k) for k, _ in summary)
        lines += [f"  {k:<{width}}  {v}" for k, v in summary]

        lines += ["", "  latency of successful requests (ms)"]
        header = f"  {'size':<12}{'count':>7}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}{'max':>10}"
        lines += [header, "  " + "-" * (len(header) - 2)]
        rows = [("all", self.latency)] + sorted(self.latency_by_size.items()) + list(self.latency_by_control.items())
        for name, st in rows:
            lines.append(
                f"  {name:<12}{st.count:>7}{_ms(st.p50_ms):>10}{_ms(st.p90_ms):>10}{_ms(st.p99_ms):>10}"
                f"{_ms(st.mean_ms):>10}{_ms(st.max_ms):>10}"
            )
        if self.server_timings_p50_ms:
            lines += ["", f"  server timings, p50 over {self.server_timings_count} requests (ms; outside server ="
                      " latency - total_ms)"]
            timing_rows = [*self.server_timings_p50_ms.items(), ("outside server", self.outside_server_p50_ms)]
            width = max(len(name) for name, _ in timing_rows)
            lines += [f"    {name:<{width}}{_ms(value):>10}" for name, value in timing_rows]
        if self.errors_by_status or self.errors_by_exception:
            lines += ["", "  errors"]
            for status, count in sorted(self.errors_by_status.items()):
                lines.append(f"    HTTP {status:<20}{count:>7}")
            for kind, count in sorted(self.errors_by_exception.items()):
                lines.append(f"    {kind:<25}{count:>7}")
            for sample in self.error_samples:
                lines.append(f"    e.g. {sample}")
        return "\n".join(lines)


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def build_report(
    config: LoadConfig,
    records: list[RequestRecord],
    warmup_records: list[RequestRecord],
    wall_s: float,
    dropped: int,
    started_at: str,
) -> LoadReport:
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    by_size: dict[str, list[float]] = {}
    for r in ok:
        by_size.setdefault(r.size, []).append(r.latency_ms)
    errors_by_status = Counter(str(r.status) for r in failed if r.status is not None)
    errors_by_exception = Counter(r.error_kind or "unknown" for r in failed if r.status is None)
    samples: list[str] = []
    for r in failed:
        if r.error and r.error not in samples:
            samples.append(r.error)
        if len(samples) >= 5:
            break
    timed = [r for r in ok if r.server_timings]
    by_field: dict[str, list[float]] = {}
    for r in timed:
        for name, value in r.server_timings.items():
            by_field.setdefault(name, []).append(value)
    outside = [r.latency_ms - r.server_timings["total_ms"] for r in timed if "total_ms" in r.server_timings]
    images = sum(r.images for r in ok)
    within = [r for r in ok if config.slo_ms is None or r.latency_ms <= config.slo_ms]
    return LoadReport(
        label=config.label,
        mode=config.mode,
        url=config.url.rstrip("/") + config.path,
        started_at=started_at,
        wall_s=wall_s,
        sent=len(records),
        ok=len(ok),
        failed=len(failed),
        dropped=dropped,
        images=images,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        images_per_s=images / wall_s if wall_s > 0 else 0.0,
        slo_ms=config.slo_ms,
        within_slo=len(within),
        goodput_images_per_s=goodput(records, wall_s, config.slo_ms),
        latency=LatencyStats.of([r.latency_ms for r in ok]),
        latency_by_size={size: LatencyStats.of(values) for size, values in sorted(by_size.items())},
        latency_by_control={} if not config.control_fraction else {
            name: LatencyStats.of([r.latency_ms for r in ok if r.control == (name == "control")])
            for name in ("control", "plain")},
        server_timings_count=len(timed),
        server_timings_p50_ms={name: percentile(values, 50) for name, values in by_field.items()},
        outside_server_p50_ms=percentile(outside, 50),
        errors_by_status=dict(sorted(errors_by_status.items())),
        errors_by_exception=dict(sorted(errors_by_exception.items())),
        error_samples=samples,
        warmup_sent=len(warmup_records),
        warmup_ok=sum(r.ok for r in warmup_records),
        config=config.summary(),
        records=warmup_records + records,
    )
