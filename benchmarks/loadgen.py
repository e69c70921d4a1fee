"""Load generator for `POST /v1/images/generations` (OpenAI images API shape).

Two load shapes:
- closed loop (`--concurrency N`): N clients each send their next request as soon as the last one
  returns, which measures the best throughput at a fixed number of requests in flight;
- open loop (`--rate R`): requests arrive as a Poisson process at R per second whatever the server
  does, which shows latency at a given offered load. In-flight requests are capped (`--max-in-flight`);
  an arrival that finds the cap reached is dropped and counted, so overload shows instead of hiding
  in a client-side queue.

Every 200 is checked (JSON shape, image count, base64 that decodes to PNG/JPEG/WebP bytes); a
malformed 200 counts as an error. Warm-up requests run first, as their own phase, and are left out
of every figure. When a response carries our server's non-standard `timings` object (milliseconds
per stage), the report gives the median of each field and of the time spent outside the server
(client latency - `total_ms`: HTTP, JSON, base64, proxies); other servers simply have no such figures.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --concurrency 8 --duration 60 \
        --size-mix "1024x1024:0.7,512x512:0.3" --slo-ms 5000 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_PATH = "/v1/images/generations"
DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts.txt"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


# ----------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SizeWeight:
    width: int
    height: int
    weight: float

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def parse_size(text: str) -> tuple[int, int]:
    """`"1024x768"` -> (1024, 768)."""
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size {text!r} is not WxH (e.g. 1024x1024)")
    width, height = int(parts[0]), int(parts[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"size {text!r} has a zero side")
    return width, height


def parse_size_mix(text: str) -> list[SizeWeight]:
    """`"1024x1024:0.7,512x512:0.3"` -> weights normalised to sum 1; a size without weight gets 1."""
    entries: list[tuple[int, int, float]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        size_text, _, weight_text = item.partition(":")
        width, height = parse_size(size_text)
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise ValueError(f"weight {weight_text!r} of size {size_text!r} is not a number") from None
        if not weight > 0 or math.isinf(weight):
            raise ValueError(f"weight of size {size_text!r} must be a positive number, got {weight_text!r}")
        entries.append((width, height, weight))
    if not entries:
        raise ValueError("size mix is empty")
    sizes = [f"{w}x{h}" for w, h, _ in entries]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"size mix names a size twice: {text!r}")
    total = sum(w for _, _, w in entries)
    return [SizeWeight(w, h, weight / total) for w, h, weight in entries]


def load_prompts(path: str | Path) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


@dataclass
class LoadConfig:
    """One load run. Give exactly one of `concurrency` / `rate`, and `duration_s` and/or `requests`."""

    url: str = DEFAULT_URL
    path: str = DEFAULT_PATH
    api_key: str | None = None
    model: str | None = None  # omitted from the body when None: the server's default model
    concurrency: int | None = None
    rate: float | None = None
    max_in_flight: int = 64  # open loop only: the cap on requests in flight
    duration_s: float | None = None
    requests: int | None = None  # measured requests (closed loop) or arrivals (open loop)
    warmup: int = 0
    size_mix: list[SizeWeight] = field(default_factory=lambda: parse_size_mix("1024x1024"))
    steps: int | None = None  # omitted when None: the server's default
    n: int = 1
    seed_base: int | None = 0  # request i gets seed seed_base + i * n; None sends no seed
    prompts: list[str] = field(default_factory=list)  # empty: read DEFAULT_PROMPTS
    timeout_s: float = 300.0
    slo_ms: float | None = None
    label: str = ""
    shuffle_seed: int = 0  # drives prompt and size choice and the arrival times
    progress: bool = False

    def validate(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be > 0")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if self.duration_s is None and self.requests is None:
            raise ValueError("give duration_s and/or requests to say when to stop")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError("duration_s must be > 0")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be >= 1")
        if self.warmup < 0 or self.n < 1 or not self.timeout_s > 0:
            raise ValueError("warmup must be >= 0, n >= 1 and timeout_s > 0")
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.slo_ms is not None and not self.slo_ms > 0:
            raise ValueError("slo_ms must be > 0")
        if not self.size_mix:
            raise ValueError("size_mix is empty")

    @property
    def in_flight_cap(self) -> int:
        return self.concurrency if self.concurrency is not None else self.max_in_flight

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "open"

    def summary(self) -> dict[str, Any]:
        """The config as written to the report (prompts by count, not text)."""
        out = asdict(self)
        out["prompts"] = len(self.prompts)
        out["size_mix"] = {s.size: round(s.weight, 6) for s in self.size_mix}
        out.pop("api_key")
        out["api_key_set"] = self.api_key is not None
        out["mode"] = self.mode
        return out


# ----------------------------------------------------------------------------------------- stats


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


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
        rows = [("all", self.latency)] + sorted(self.latency_by_size.items())
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


# ------------------------------------------------------------------------------- response checking


def image_kind(data: bytes) -> str | None:
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def check_response(body: bytes, expected: int) -> tuple[int, str | None, dict[str, float] | None]:
    """(images found, problem or None, the server's `timings` or None) for a 200 body, from one JSON
    parse. Runs in a worker thread: decoding is CPU work."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return 0, f"body is not JSON ({exc})", None
    images, problem = _check_images(payload, expected)
    return images, problem, server_timings(payload)


def server_timings(payload: Any) -> dict[str, float] | None:
    """The finite numbers of a response's `timings` object, or None: standard servers send none."""
    timings = payload.get("timings") if isinstance(payload, dict) else None
    if not isinstance(timings, dict):
        return None
    out: dict[str, float] = {}
    for name, value in timings.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an integer too large for a float
                continue
            if math.isfinite(value):
                out[str(name)] = value
    return out or None


def _check_images(payload: Any, expected: int) -> tuple[int, str | None]:
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return 0, "no 'data' list in the response"
    count = 0
    for i, item in enumerate(data):
        b64 = item.get("b64_json") if isinstance(item, dict) else None
        if not isinstance(b64, str) or not b64:
            return count, f"data[{i}] has no b64_json"
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            return count, f"data[{i}].b64_json is not valid base64"
        if image_kind(raw) is None:
            return count, f"data[{i}] is not a PNG, JPEG or WebP image"
        count += 1
    if count != expected:
        return count, f"expected {expected} images, got {count}"
    return count, None


def _error_message(body: bytes) -> str:
    """The OpenAI-style `error.message`, or the start of the body."""
    try:
        payload = json.loads(body)
        message = payload["error"]["message"]
        if isinstance(message, str):
            return message[:200]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    return body[:200].decode("utf-8", "replace").strip()


# ------------------------------------------------------------------------------------------ runner


class _Progress:
    """One status line on stderr, redrawn at most ten times a second."""

    def __init__(self, enabled: bool, label: str, total: int | None, duration_s: float | None):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.label = f"[{label}] " if label else ""
        self.total = total
        self.duration_s = duration_s
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.last_line = ""
        self.done = self.ok = self.failed = self.in_flight = self.dropped = 0
        self.phase = "run"

    def update(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last_draw < (0.1 if self.tty else 5.0):
            return
        self.last_draw = now
        elapsed = now - self.start
        fractions = []
        if self.total:
            fractions.append(self.done / self.total)
        if self.duration_s:
            fractions.append(elapsed / self.duration_s)
        frac = min(1.0, max(fractions)) if fractions else 0.0
        bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        rate = self.ok / elapsed if elapsed > 0 else 0.0
        extra = f" dropped {self.dropped}" if self.dropped else ""
        line = (
            f"{self.label}{self.phase} [{bar}] {count} ok {self.ok} err {self.failed} "
            f"in-flight {self.in_flight}{extra} {rate:.2f} req/s {elapsed:.0f}s"
        )
        if line == self.last_line:
            return
        self.last_line = line
        sys.stderr.write(f"\r{line}   " if self.tty else f"{line}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            if self.tty:
                sys.stderr.write("\n")
            sys.stderr.flush()


class _Runner:
    def __init__(self, config: LoadConfig, session: aiohttp.ClientSession):
        self.config = config
        self.session = session
        self.endpoint = config.url.rstrip("/") + config.path
        self.headers = {"Content-Type": "application/json"}
        if config.api_key:
            self.headers["Authorization"] = f"Bearer {config.api_key}"
        self.prompts = config.prompts
        self.in_flight = 0
        self.max_seen_in_flight = 0
        self.cut_records: list[RequestRecord] = []

    def request_body(self, index: int) -> tuple[dict[str, Any], str, int | None]:
        """Prompt and size depend only on the request's index, so runs are comparable."""
        rng = random.Random(self.config.shuffle_seed * 1_000_003 + index)
        prompt = self.prompts[rng.randrange(len(self.prompts))]
        choice = rng.choices(self.config.size_mix, weights=[s.weight for s in self.config.size_mix])[0]
        seed = None if self.config.seed_base is None else self.config.seed_base + index * self.config.n
        body: dict[str, Any] = {
            "prompt": prompt,
            "n": self.config.n,
            "size": choice.size,
            "response_format": "b64_json",
        }
        if self.config.model is not None:
            body["model"] = self.config.model
        if seed is not None:
            body["seed"] = seed
        if self.config.steps is not None:
            body["num_inference_steps"] = self.config.steps
        return body, choice.size, seed

    async def one_request(self, index: int, phase_start: float, warmup: bool, progress: _Progress) -> RequestRecord:
        body, size, seed = self.request_body(index)
        self.in_flight += 1
        self.max_seen_in_flight = max(self.max_seen_in_flight, self.in_flight)
        progress.in_flight = self.in_flight
        sent = time.perf_counter()
        record = RequestRecord(
            index=index, start_s=sent - phase_start, latency_ms=0.0, size=size, n=self.config.n,
            seed=seed, status=None, ok=False, images=0, warmup=warmup,
        )
        try:
            timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
            async with self.session.post(self.endpoint, json=body, headers=self.headers, timeout=timeout) as resp:
                raw = await resp.read()
                record.latency_ms = (time.perf_counter() - sent) * 1000
                record.status = resp.status
            if record.status == 200:
                images, problem, timings = await asyncio.to_thread(check_response, raw, self.config.n)
                record.images = images
                if problem is None:
                    record.ok = True
                    record.server_timings = timings
                else:
                    record.images = 0
                    record.error_kind = "200"
                    record.error = f"malformed 200: {problem}"
            else:
                record.error_kind = str(record.status)
                record.error = f"http {record.status}: {_error_message(raw)}"
        except asyncio.CancelledError:
            # Cut at the hard stop: still a failed request, kept so that nothing goes missing.
            record.latency_ms = (time.perf_counter() - sent) * 1000
            record.status = None
            record.error_kind = "Cancelled"
            record.error = "Cancelled: still running at the hard stop (duration + timeout)"
            self.cut_records.append(record)
            raise
        except Exception as exc:  # connection errors, timeouts, anything else: counted by type
            record.latency_ms = (time.perf_counter() - sent) * 1000
            record.status = None
            record.error_kind = type(exc).__name__
            detail = str(exc) or (
                f"no complete response within {self.config.timeout_s:g} s" if isinstance(exc, TimeoutError) else "no detail"
            )
            record.error = f"{type(exc).__name__}: {detail}"[:300]
        finally:
            self.in_flight -= 1
            progress.in_flight = self.in_flight
            progress.done += 1
            if record.ok:
                progress.ok += 1
            else:
                progress.failed += 1
            progress.update()
        return record

    async def closed_loop(
        self, clients: int, first_index: int, count: int | None, duration_s: float | None,
        warmup: bool, progress: _Progress,
    ) -> tuple[list[RequestRecord], float]:
        """`clients` workers sending back to back until `count` requests or `duration_s` is reached."""
        start = time.perf_counter()
        end = start + duration_s if duration_s is not None else math.inf
        next_ticket = 0
        records: list[RequestRecord] = []
        self.cut_records = []

        async def worker() -> None:
            nonlocal next_ticket
            while time.perf_counter() < end and (count is None or next_ticket < count):
                ticket = next_ticket
                next_ticket += 1
                records.append(await self.one_request(first_index + ticket, start, warmup, progress))

        workers = [asyncio.create_task(worker()) for _ in range(clients)]
        await self._join(workers, start, duration_s)
        return records + self.cut_records, time.perf_counter() - start

    async def open_loop(
        self, rate: float, first_index: int, count: int | None, duration_s: float | None, progress: _Progress,
    ) -> tuple[list[RequestRecord], float, int]:
        """Poisson arrivals; an arrival that finds `max_in_flight` requests running is dropped."""
        rng = random.Random(f"arrivals:{self.config.shuffle_seed}")
        start = time.perf_counter()
        tasks: list[asyncio.Task] = []
        self.cut_records = []
        dropped = 0
        arrival = 0.0
        arrivals = 0
        while count is None or arrivals < count:
            arrival += rng.expovariate(rate)
            if duration_s is not None and arrival >= duration_s:
                break
            delay = start + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            arrivals += 1
            if self.in_flight >= self.config.max_in_flight:
                dropped += 1
                progress.dropped = dropped
                progress.update()
                continue
            tasks.append(asyncio.create_task(self.one_request(first_index + arrivals - 1, start, False, progress)))
        await self._join(tasks, start, duration_s)
        records = [t.result() for t in tasks if not t.cancelled()] + self.cut_records
        return records, time.perf_counter() - start, dropped

    async def _join(self, tasks: list[asyncio.Task], start: float, duration_s: float | None) -> None:
        """Waits for every task; with a duration, cancels what still runs at duration + timeout."""
        if not tasks:
            return
        limit = None
        if duration_s is not None:
            limit = max(0.0, start + duration_s + self.config.timeout_s - time.perf_counter())
        _, still = await asyncio.wait(tasks, timeout=limit)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still)


async def run_load(config: LoadConfig) -> LoadReport:
    """Runs the warm-up phase, then the measured phase, and returns the report."""
    if not config.prompts:
        config.prompts = load_prompts(DEFAULT_PROMPTS)
    config.validate()
    cap = config.in_flight_cap
    connector = aiohttp.TCPConnector(limit=cap, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        runner = _Runner(config, session)
        warmup_records: list[RequestRecord] = []
        if config.warmup:
            progress = _Progress(config.progress, config.label, config.warmup, None)
            progress.phase = "warm-up"
            warmup_records, _ = await runner.closed_loop(
                min(cap, config.warmup), 0, config.warmup, None, True, progress
            )
            progress.close()
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        progress = _Progress(config.progress, config.label, config.requests, config.duration_s)
        first = config.warmup
        if config.concurrency is not None:
            records, wall_s = await runner.closed_loop(
                config.concurrency, first, config.requests, config.duration_s, False, progress
            )
            dropped = 0
        else:
            records, wall_s, dropped = await runner.open_loop(
                config.rate, first, config.requests, config.duration_s, progress
            )
        progress.close()
    records.sort(key=lambda r: (math.isnan(r.start_s), r.start_s))
    return build_report(config, records, warmup_records, wall_s, dropped, started_at)


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen",
        description="Load generator for an OpenAI-style POST /v1/images/generations endpoint.",
    )
    p.add_argument("--url", default=DEFAULT_URL, help="server base URL (default %(default)s)")
    p.add_argument("--path", default=DEFAULT_PATH, help="endpoint path (default %(default)s)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--model", default=None, help="'model' field of the body; omitted when not given")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=int, help="closed loop: N clients sending back to back")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals at R requests/s")
    p.add_argument("--max-in-flight", type=int, default=64, help="open loop: cap on requests in flight")
    p.add_argument("--duration", type=float, default=None, help="stop sending after S seconds")
    p.add_argument("--requests", type=int, default=None, help="stop after K measured requests (arrivals)")
    p.add_argument("--warmup", type=int, default=0, help="K warm-up requests first, left out of the figures")
    p.add_argument("--size-mix", default="1024x1024", help='weighted sizes, e.g. "1024x1024:0.7,512x512:0.3"')
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (server default when absent)")
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--seed-base", type=int, default=0, help="request i uses seed SEED_BASE + i*n")
    p.add_argument("--no-seed", action="store_true", help="send no seed: the server picks one")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompt file, one per line")
    p.add_argument("--shuffle-seed", type=int, default=0, help="drives prompt/size choice and arrivals")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    p.add_argument("--slo-ms", type=float, default=None, help="latency objective for goodput")
    p.add_argument("--json", dest="json_out", default=None, help="write the full report to this file")
    p.add_argument("--label", default="", help="name of this run in the report")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    requests = args.requests
    if args.duration is None and requests is None:
        requests = 100
    return LoadConfig(
        url=args.url,
        path=args.path,
        api_key=args.api_key,
        model=args.model,
        concurrency=args.concurrency,
        rate=args.rate,
        max_in_flight=args.max_in_flight,
        duration_s=args.duration,
        requests=requests,
        warmup=args.warmup,
        size_mix=parse_size_mix(args.size_mix),
        steps=args.steps,
        n=args.n,
        seed_base=None if args.no_seed else args.seed_base,
        prompts=load_prompts(args.prompts),
        timeout_s=args.timeout,
        slo_ms=args.slo_ms,
        label=args.label,
        shuffle_seed=args.shuffle_seed,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        config.validate()
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    report = asyncio.run(run_load(config))
    print(report.format_table())
    if args.json_out:
        report.write_json(args.json_out)
        print(f"\nwrote {args.json_out}")
    return 0 if report.ok > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
