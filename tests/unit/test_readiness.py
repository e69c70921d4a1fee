"""The readiness probe's snapshot: a not-ready one is read again before the answer, so ready is
answered as soon as the control plane says so; a ready one answers without a read."""

from __future__ import annotations

import asyncio
import time

from serve_app.readiness import Readiness, ReadinessProbe

STAGES = ["PromptStyler", "TextEncoder", "Denoiser", "VaeDecoder"]


class ControlPlane:
    """What `serve.status()` would say, counted; `delay_s` is how long one read takes."""

    def __init__(self, delay_s: float = 0.0):
        self.running = False
        self.reads = 0
        self.delay_s = delay_s

    def read(self, app_name: str, stage_names: list[str]) -> Readiness:
        self.reads += 1
        time.sleep(self.delay_s)
        return Readiness({name: self.running for name in stage_names}, time.monotonic())


def wait_for_first_poll(probe: ReadinessProbe, plane: ControlPlane) -> None:
    deadline = time.monotonic() + 10
    while probe.current.taken_at == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert plane.reads == 1 and not probe.current.ready(probe.stale_s)


def test_ready_is_answered_as_soon_as_the_control_plane_says_so():
    plane = ControlPlane()
    probe = ReadinessProbe("zimage", STAGES, refresh_s=3600, read=plane.read)  # the poller reads once
    wait_for_first_poll(probe, plane)
    assert not asyncio.run(probe.check()).ready(probe.stale_s) and plane.reads == 2
    plane.running = True  # every stage RUNNING: what `serve run`'s "is ready" line follows
    snapshot = asyncio.run(probe.check())
    assert snapshot.ready(probe.stale_s) and snapshot.stages == dict.fromkeys(STAGES, True)
    assert plane.reads == 3
    for _ in range(5):  # a ready snapshot answers without asking the control plane
        assert asyncio.run(probe.check()).ready(probe.stale_s)
    assert plane.reads == 3


def test_concurrent_checks_of_a_not_ready_server_share_one_read():
    plane = ControlPlane(delay_s=0.2)
    probe = ReadinessProbe("zimage", STAGES, refresh_s=3600, read=plane.read)
    wait_for_first_poll(probe, plane)

    async def twenty() -> list[Readiness]:
        return await asyncio.gather(*(probe.check() for _ in range(20)))

    answers = asyncio.run(twenty())
    assert not any(a.ready(probe.stale_s) for a in answers) and plane.reads == 2


def test_a_read_that_hangs_leaves_the_answer_not_ready_within_its_bound():
    plane = ControlPlane()
    probe = ReadinessProbe("zimage", STAGES, refresh_s=3600, read=plane.read, read_timeout_s=0.2)
    wait_for_first_poll(probe, plane)
    plane.running, plane.delay_s = True, 2.0

    async def timed() -> tuple[Readiness, float]:
        started = time.monotonic()
        return await probe.check(), time.monotonic() - started

    snapshot, seconds = asyncio.run(timed())  # (asyncio.run itself then waits for the read's thread)
    assert not snapshot.ready(probe.stale_s) and seconds < 1.0
