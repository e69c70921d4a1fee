"""Overload on the real Serve app (tiny, CPU): a burst far over `api.max_inflight_requests` is refused
fast, each refusal says when to come back, and the admitted requests barely notice the surplus.

The setup: 200 requests at once, `api.max_inflight_requests` 16, the Denoiser's `max_queued_requests` 4.
A refusal must take at most 1 s at p99, or no more than 1.25x the cheapest answer the server gives
under the same load (a burst of GET /v1/models beside the 16 admitted generations), and the admitted
requests at most 1.5x as long as 16 alone. Those bounds are checked only on a machine that is not
itself overloaded (load average under 4 per core): on a 2-core CPU shared with other work at load
average 30 to 80, a GET /v1/models took 2.5 s at p50 and the figures swung by 2-3x from run to run;
at 5.4 per core the refusals took 0.97 s at p99 and the admitted 0.96x their time alone.
What a refusal says (Retry-After) is checked always. Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import json
import math
import os

import pytest

from benchmarks.burst import MODELS, burst, percentile
from tests.integration.conftest import ServedApp

pytestmark = pytest.mark.integration

ADMITTED = 16
SURPLUS = 200
REFUSAL_P99_S = 1.0
REFUSAL_OVER_FLOOR = 1.25
ADMITTED_SLOWDOWN = 1.5
BURST_TIMEOUT_S = 300
BUSY_MACHINE_LOAD = 4.0


def limits(served: ServedApp) -> list[dict]:
    return [{"name": "Ingress", "user_config": {"api": {"max_inflight_requests": ADMITTED}}},
            {"name": "Denoiser", "max_queued_requests": 4, "user_config": served.args["denoiser"]["user_config"]}]


def test_a_burst_over_the_limit_is_refused_fast_and_told_when_to_retry(served):
    try:
        served.deploy(limits(served))
        alone = asyncio.run(burst(served.url, ADMITTED, timeout_s=BURST_TIMEOUT_S))
        floor = asyncio.run(burst(served.url, ADMITTED, timeout_s=BURST_TIMEOUT_S, trivial=SURPLUS - ADMITTED))
        crowded = asyncio.run(burst(served.url, SURPLUS, timeout_s=BURST_TIMEOUT_S))
    finally:
        served.deploy()
    print(json.dumps({"alone": alone.summary(), "floor": floor.summary(), "crowded": crowded.summary()}))
    assert alone.count(200) == ADMITTED and floor.count(200) == ADMITTED
    assert floor.count(200, MODELS) == SURPLUS - ADMITTED
    assert crowded.count(200) + crowded.count(503) == SURPLUS and crowded.count(200) >= ADMITTED
    refused = [a for a in crowded.answers if a.status == 503]
    for answer in refused:  # whole seconds for HTTP, milliseconds for OpenAI's clients: the same wait
        assert answer.retry_after.isdigit() and int(answer.retry_after) >= 1, answer
        assert int(answer.retry_after) == max(1, math.ceil(int(answer.retry_after_ms) / 1000)), answer
    assert len({a.retry_after_ms for a in refused}) > 1  # spread over the slots as they free, not one constant
    if load_per_core() > BUSY_MACHINE_LOAD:
        pytest.skip(f"load average {load_per_core():.1f} per core: too busy for the latency bounds "
                    "(Retry-After was checked)")
    refusal_p99, floor_p99 = percentile([a.seconds for a in refused], 99), percentile(floor.seconds(200, MODELS), 99)
    assert refusal_p99 <= max(REFUSAL_P99_S, REFUSAL_OVER_FLOOR * floor_p99), (refusal_p99, floor_p99)
    admitted_p50, alone_p50 = percentile(crowded.seconds(200), 50), percentile(alone.seconds(200), 50)
    assert admitted_p50 <= ADMITTED_SLOWDOWN * alone_p50, (admitted_p50, alone_p50)


def load_per_core() -> float:
    return os.getloadavg()[0] / (os.cpu_count() or 1)
