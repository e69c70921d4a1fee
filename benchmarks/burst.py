"""A burst of concurrent requests and what came back: each request's status, latency and the
`Retry-After` a 503 carried. Used by the overload test (tests/integration/test_admission.py) and
by hand: `python -m benchmarks.burst --url http://127.0.0.1:8000 --requests 200`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

GENERATIONS = "/v1/images/generations"
MODELS = "/v1/models"
BODY = {"prompt": "a lighthouse on a cliff at dusk", "size": "512x512", "num_inference_steps": 4}


@dataclass(frozen=True)
class Answer:
    route: str
    status: int
    seconds: float
    retry_after: str | None = None
    retry_after_ms: str | None = None
    code: str | None = None  # an error's `code` (who refused: `overloaded` at admission, another at a stage)


@dataclass
class Burst:
    answers: list[Answer] = field(default_factory=list)

    def seconds(self, status: int, route: str = GENERATIONS) -> list[float]:
        return sorted(a.seconds for a in self.answers if a.status == status and a.route == route)

    def count(self, status: int, route: str = GENERATIONS) -> int:
        return sum(a.status == status and a.route == route for a in self.answers)

    def codes(self, status: int) -> dict[str | None, int]:
        """How many answers of `status` carried each error code."""
        found: dict[str | None, int] = {}
        for answer in self.answers:
            if answer.status == status:
                found[answer.code] = found.get(answer.code, 0) + 1
        return found

    def summary(self) -> dict:
        kinds = sorted({(a.route, a.status) for a in self.answers})
        return {f"{route} {status}": {"count": self.count(status, route),
                                      "p50_s": round(percentile(self.seconds(status, route), 50), 3),
                                      "p99_s": round(percentile(self.seconds(status, route), 99), 3)}
                for route, status in kinds}


def error_code(response: httpx.Response) -> str | None:
    if response.status_code < 400:
        return None
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "(no OpenAI error body)"


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of `values` (sorted or not); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil(n * pct / 100)
    return ordered[int(rank) - 1]


async def burst(url: str, requests: int, body: dict | None = None, timeout_s: float = 600, trivial: int = 0
                ) -> Burst:
    """`requests` POSTs to the generations route at once (distinct seeds), each on its own connection,
    and with them `trivial` GETs of /v1/models: what any answer costs the server under that load."""
    limits = httpx.Limits(max_connections=requests + trivial + 8, max_keepalive_connections=0)
    out = Burst()
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        async def one(seed: int) -> None:
            start = time.perf_counter()
            if seed < 0:
                response = await client.get(MODELS)
            else:
                response = await client.post(GENERATIONS, json={**(body or BODY), "seed": seed})
            out.answers.append(Answer(response.request.url.path, response.status_code, time.perf_counter() - start,
                                      response.headers.get("retry-after"), response.headers.get("retry-after-ms"),
                                      error_code(response)))

        await asyncio.gather(*(one(seed) for seed in range(-trivial, requests)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--trivial", type=int, default=0, help="GETs of /v1/models sent with them")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(burst(args.url, args.requests, trivial=args.trivial)).summary(), indent=2))


if __name__ == "__main__":
    main()
