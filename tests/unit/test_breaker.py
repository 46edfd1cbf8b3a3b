"""The circuit breaker and the retry backoff of the saga processor, with an injected clock."""

from __future__ import annotations

from daybook.infrastructure.sagas.breaker import BreakerState, CircuitBreaker
from daybook.infrastructure.sagas.processor import Backoff


class Clock:
    """Monotonic seconds that move only when the test says."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_it_opens_after_failures_in_a_row_and_lets_one_trial_through_after_the_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker("payments", clock, threshold=3, cooldown=10)
    for _ in range(2):
        assert breaker.allow()
        breaker.failed()
    breaker.succeeded()  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.failed()
    assert breaker.state is BreakerState.OPEN and breaker.opened == 1
    assert not breaker.allow()
    assert breaker.reopens_in() == 10
    clock.now += 4
    assert not breaker.allow() and breaker.reopens_in() == 6
    clock.now += 6
    assert breaker.reopens_in() == 0
    assert breaker.allow()  # the trial
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # one trial at a time
    breaker.failed()  # the trial failed: open again, for another cooldown
    assert breaker.state is BreakerState.OPEN and breaker.opened == 2
    assert not breaker.allow()
    clock.now += 10
    assert breaker.allow()
    assert breaker.reopens_in() is None  # half-open, not open
    breaker.succeeded()
    assert breaker.state is BreakerState.CLOSED and breaker.allow() and breaker.allow()


def test_backoff_is_exponential_with_full_jitter() -> None:
    backoff = Backoff(initial=0.1, ceiling=1.0)
    bounds = []
    for attempt in range(1, 7):
        bounds.append(backoff.delay(attempt, lambda low, high: high))
        assert backoff.delay(attempt, lambda low, high: low) == 0.0
    assert bounds == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
