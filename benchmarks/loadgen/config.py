"""What one load run is: the sizes and their weights, the prompts, and the validated `LoadConfig`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deployments import geometry

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_PATH = "/v1/images/generations"
DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "prompts.txt"


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
    width, height = geometry.parse_size(text)
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


def parse_loras(text: str) -> list[str]:
    """`"ink,watercolor"` -> the adapter names a request picks one of; empty text: no adapters."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"the adapter list names an adapter twice: {text!r}")
    return names


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
    fresh_prompts: bool = False  # every request a prompt never sent before, shaped like `prompts` (fresh.py)
    timeout_s: float = 300.0
    slo_ms: float | None = None
    label: str = ""
    shuffle_seed: int = 0  # drives prompt, size and adapter choice and the arrival times
    loras: list[str] = field(default_factory=list)  # each request uses one, picked uniformly (seeded); empty: none
    lora_scale: float = 1.0
    control_fraction: float = 0.0  # the share of requests with a control image (ControlNet), picked seeded
    control_image: bytes | None = None  # what they send (PNG/JPEG/WebP bytes); None: control.default_control_image()
    control_preprocess: str | None = "canny"  # the server turns the image into an edge map; None: sent as is
    control_scale: float = 0.75
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
        if len(set(self.loras)) != len(self.loras) or not all(self.loras):
            raise ValueError("loras must be distinct, non-empty adapter names")
        if not -2.0 <= self.lora_scale <= 2.0:
            raise ValueError("lora_scale must be within -2..2")
        if not 0.0 <= self.control_fraction <= 1.0:
            raise ValueError("control_fraction must be within 0..1")
        if not 0.0 <= self.control_scale <= 2.0:
            raise ValueError("control_scale must be within 0..2")
        if self.control_preprocess not in (None, "canny"):
            raise ValueError("control_preprocess must be 'canny' or None")

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
        out["control_image"] = None if self.control_image is None else f"{len(self.control_image)} bytes"
        out["size_mix"] = {s.size: round(s.weight, 6) for s in self.size_mix}
        out.pop("api_key")
        out["api_key_set"] = self.api_key is not None
        out["mode"] = self.mode
        return out
