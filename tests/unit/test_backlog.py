"""`Retry-After` from the work queued ahead and the measured step rate (serve_app.backlog), on a
clock the test moves; and the headers a 503 carries."""

from __future__ import annotations

import pytest

from serve_app import backlog as backlog_module
from serve_app.backlog import Backlog, plan_work
from serve_app.errors import ApiError, error_response


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(backlog_module.time, "monotonic", clock)
    return clock


def admit(backlog: Backlog, work: float) -> int:
    ticket = backlog.start()
    backlog.describe(ticket, work)
    return ticket


def test_work_counts_as_the_denoisers_megapixel_steps():
    assert plan_work(1, 1024, 1024, 8, 1.0, edit=False) == 8
    assert plan_work(2, 512, 512, 8, 1.0, edit=False) == 4  # two images of a quarter megapixel
    assert plan_work(1, 1024, 1024, 8, 0.5, edit=True) == 4  # an edit runs the last steps * strength


def test_without_a_measured_rate_a_refused_client_is_told_the_minimum(clock):
    backlog = Backlog(min_s=0.5)
    admit(backlog, 2.0)
    assert backlog.rate() is None
    assert backlog.retry_after_s() == 0.5


def test_waits_follow_the_work_ahead_and_spread_the_refused_clients(clock):
    backlog = Backlog(min_s=0.5)
    a, b = admit(backlog, 2.0), admit(backlog, 2.0)
    clock.now += 2
    backlog.finish(a, completed=True)
    clock.now += 2
    backlog.finish(b, completed=True)
    assert backlog.rate() == pytest.approx(1.0)  # 2 megapixel-steps in the 2 busy seconds after the first finished

    admit(backlog, 2.0), admit(backlog, 2.0)
    clock.now += 1
    # two running side by side progress at 0.5 each: 4 s for 2.0, 1 s gone
    assert backlog.retry_after_s() == pytest.approx(3.0)
    assert backlog.retry_after_s() == pytest.approx(5.0)  # one client ahead of it, one mean request (2.0) later
    assert backlog.retry_after_s() == pytest.approx(7.0)
    clock.now += 5.5  # the first two promises have passed, the third not; the running pair is overdue
    assert backlog.retry_after_s() == pytest.approx(2.0)


def test_idle_time_does_not_dilute_the_rate_and_waits_are_capped(clock):
    backlog = Backlog(max_s=60.0)
    a = admit(backlog, 1.0)
    clock.now += 1
    backlog.finish(a, completed=True)
    clock.now += 1000  # idle: not busy time
    b = admit(backlog, 1.0)
    clock.now += 1
    backlog.finish(b, completed=True)
    assert backlog.rate() == pytest.approx(1.0)
    admit(backlog, 500.0)
    assert backlog.retry_after_s() == 60.0


def test_a_failed_request_does_not_count_towards_the_rate(clock):
    backlog = Backlog()
    tickets = [admit(backlog, 1.0) for _ in range(3)]
    clock.now += 1
    backlog.finish(tickets[0], completed=True)
    backlog.finish(tickets[1], completed=False)
    clock.now += 1
    backlog.finish(tickets[2], completed=True)
    assert backlog.rate() == pytest.approx(1.0)
    assert not backlog.running


@pytest.mark.parametrize(("seconds", "after", "after_ms"), [(0.3, "1", "300"), (2.4, "3", "2400"), (7.0, "7", "7000"),
                                                       (46.0004, "47", "46001")])
def test_a_503_says_when_to_come_back_in_seconds_and_milliseconds(seconds, after, after_ms):
    response = error_response(ApiError(503, "busy", code="overloaded", retry_after_s=seconds))
    assert response.headers["retry-after"] == after and response.headers["retry-after-ms"] == after_ms
    assert "retry-after" not in error_response(ApiError(400, "bad")).headers
