"""Bounded admission and rate limits, on a clock the test moves."""

from __future__ import annotations

import pytest

from daybook.infrastructure.http.admission import MAX_RETRY_AFTER, Door, DrainRate, RateLimits
from daybook.infrastructure.http.problems import Problem


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drained(per_second: int, seconds: int, clock: Clock) -> DrainRate:
    rate = DrainRate(window=1.0, clock=clock)
    for _ in range(per_second * seconds):
        clock.now += 1 / per_second
        rate.done()
    return rate


def test_the_drain_rate_follows_completions() -> None:
    clock = Clock()
    rate = drained(200, 5, clock)
    assert rate.per_second == pytest.approx(200, rel=0.05)


def test_a_full_door_refuses_with_retry_after_from_backlog_and_rate() -> None:
    clock = Clock()
    door = Door("command", 100, rate=drained(50, 5, clock), draw=lambda low, high: low)
    for _ in range(100):
        door.enter()
    with pytest.raises(Problem) as refused:
        door.enter()
    assert refused.value.status == 503 and refused.value.code == "overloaded"
    assert refused.value.headers["Retry-After"] == "1"  # 1 ahead / 50 per second -> 1 s
    for _ in range(400):  # risk-reducing commands are admitted past the bound
        door.enter(always=True)
    assert door.retry_after() == 9  # 401 ahead at 50/s: 8.02 s, rounded up
    assert door.shed == 1 and door.inside == 500


def test_retry_after_has_jitter_and_bounds() -> None:
    clock = Clock()
    door = Door("read", 1, rate=drained(10, 3, clock), draw=lambda low, high: high)
    door.enter()
    door.inside = 41
    assert door.retry_after() == 7  # 41 ahead / 10 per second * 1.5
    door.inside = 10_000
    assert door.retry_after() == MAX_RETRY_AFTER
    idle = Door("read", 1)
    assert 1 <= idle.retry_after() <= 2  # nothing measured yet: about a second, jittered


def test_rate_limits_per_token() -> None:
    clock = Clock()
    limits = RateLimits(default_rate=2.0, clock=clock)
    limits.take("a")
    limits.take("a")
    with pytest.raises(Problem) as limited:
        limits.take("a")
    assert limited.value.status == 429 and limited.value.headers["Retry-After"] == "1"
    limits.take("b")  # another token has its own bucket
    clock.now += 0.5
    limits.take("a")  # half a second at 2/s: one more
    limits.take("c", rate=100.0)
    assert limits.limited == 1
    RateLimits(default_rate=0).take("anyone")  # 0: no limit
