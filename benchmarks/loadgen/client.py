"""Sends the load: the closed and open loops, one request's send and timing, and the check that a
200 really holds the images asked for."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import random
import sys
import time
from datetime import datetime, timezone
from typing import Any

import aiohttp
from tqdm import tqdm

from benchmarks.loadgen.config import DEFAULT_PROMPTS, LoadConfig, load_prompts
from benchmarks.loadgen.control import default_control_image, encoded
from benchmarks.loadgen.fresh import FreshPrompts
from benchmarks.loadgen.report import LoadReport, RequestRecord, build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


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


def progress_bar(config: LoadConfig, phase: str, total: int | None) -> tqdm:
    """One phase's progress on stderr; redrawn every 5 s when stderr is a log file rather than a terminal."""
    label = f"[{config.label}] " if config.label else ""
    return tqdm(
        total=total, desc=f"{label}{phase}", unit="req", file=sys.stderr, disable=not config.progress,
        mininterval=0.1 if sys.stderr.isatty() else 5.0,
    )


class _Runner:
    def __init__(self, config: LoadConfig, session: aiohttp.ClientSession):
        self.config = config
        self.session = session
        self.endpoint = config.url.rstrip("/") + config.path
        self.headers = {"Content-Type": "application/json"}
        if config.api_key:
            self.headers["Authorization"] = f"Bearer {config.api_key}"
        self.prompts = config.prompts
        self.fresh = FreshPrompts(config.prompts, config.shuffle_seed) if config.fresh_prompts else None
        self.control_b64 = encoded(config.control_image) if config.control_fraction > 0 else None
        self.in_flight = 0
        self.max_seen_in_flight = 0
        self.cut_records: list[RequestRecord] = []
        self.ok = self.failed = self.dropped = 0  # of the current phase, for the progress bar

    def start_phase(self) -> None:
        self.cut_records = []
        self.ok = self.failed = self.dropped = 0

    def show(self, progress: tqdm, done: int = 0) -> None:
        progress.set_postfix(ok=self.ok, err=self.failed, in_flight=self.in_flight, dropped=self.dropped, refresh=False)
        progress.update(done)

    def request_body(self, index: int) -> tuple[dict[str, Any], str, int | None]:
        """Prompt, size, adapter and control depend only on the request's index, so runs are comparable;
        with fresh prompts, adapters or control images, the sizes and seeds are those of the same run
        without them (the adapter and whether a request is controlled are drawn from generators of their own)."""
        rng = random.Random(self.config.shuffle_seed * 1_000_003 + index)
        prompt = self.prompts[rng.randrange(len(self.prompts))]
        if self.fresh is not None:
            prompt = self.fresh.prompt(index)
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
        if self.config.loras:
            pick = random.Random(f"lora:{self.config.shuffle_seed}:{index}").randrange(len(self.config.loras))
            body["loras"] = [{"name": self.config.loras[pick], "scale": self.config.lora_scale}]
        if self.controlled(index):
            body.update(control_image=self.control_b64, control_scale=self.config.control_scale)
            if self.config.control_preprocess is not None:
                body["control_preprocess"] = self.config.control_preprocess
        return body, choice.size, seed

    def controlled(self, index: int) -> bool:
        """Whether request `index` carries the control image: a `control_fraction` share, seeded."""
        fraction = self.config.control_fraction
        return fraction > 0 and random.Random(f"control:{self.config.shuffle_seed}:{index}").random() < fraction

    async def one_request(self, index: int, phase_start: float, warmup: bool, progress: tqdm) -> RequestRecord:
        body, size, seed = self.request_body(index)
        self.in_flight += 1
        self.max_seen_in_flight = max(self.max_seen_in_flight, self.in_flight)
        sent = time.perf_counter()
        record = RequestRecord(
            index=index, start_s=sent - phase_start, latency_ms=0.0, size=size, n=self.config.n,
            seed=seed, status=None, ok=False, images=0, warmup=warmup, control="control_image" in body,
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
            if record.ok:
                self.ok += 1
            else:
                self.failed += 1
            self.show(progress, done=1)
        return record

    async def closed_loop(
        self, clients: int, first_index: int, count: int | None, duration_s: float | None,
        warmup: bool, progress: tqdm,
    ) -> tuple[list[RequestRecord], float]:
        """`clients` workers sending back to back until `count` requests or `duration_s` is reached."""
        start = time.perf_counter()
        end = start + duration_s if duration_s is not None else math.inf
        next_ticket = 0
        records: list[RequestRecord] = []
        self.start_phase()

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
        self, rate: float, first_index: int, count: int | None, duration_s: float | None, progress: tqdm,
    ) -> tuple[list[RequestRecord], float, int]:
        """Poisson arrivals; an arrival that finds `max_in_flight` requests running is dropped."""
        rng = random.Random(f"arrivals:{self.config.shuffle_seed}")
        start = time.perf_counter()
        tasks: list[asyncio.Task] = []
        self.start_phase()
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
                self.dropped += 1
                self.show(progress)
                continue
            tasks.append(asyncio.create_task(self.one_request(first_index + arrivals - 1, start, False, progress)))
        await self._join(tasks, start, duration_s)
        records = [t.result() for t in tasks if not t.cancelled()] + self.cut_records
        return records, time.perf_counter() - start, self.dropped

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
    if config.control_fraction > 0 and config.control_image is None:
        config.control_image = default_control_image()
    config.validate()
    cap = config.in_flight_cap
    connector = aiohttp.TCPConnector(limit=cap, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        runner = _Runner(config, session)
        warmup_records: list[RequestRecord] = []
        if config.warmup:
            with progress_bar(config, "warm-up", config.warmup) as progress:
                warmup_records, _ = await runner.closed_loop(
                    min(cap, config.warmup), 0, config.warmup, None, True, progress
                )
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        first = config.warmup
        with progress_bar(config, "run", config.requests) as progress:
            if config.concurrency is not None:
                records, wall_s = await runner.closed_loop(
                    config.concurrency, first, config.requests, config.duration_s, False, progress
                )
                dropped = 0
            else:
                records, wall_s, dropped = await runner.open_loop(
                    config.rate, first, config.requests, config.duration_s, progress
                )
    records.sort(key=lambda r: (math.isnan(r.start_s), r.start_s))
    return build_report(config, records, warmup_records, wall_s, dropped, started_at)
