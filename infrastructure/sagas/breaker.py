"""A circuit breaker per remote dependency: after repeated failures, stop calling it for a
while, so sagas wait for it instead of burning their attempts (and the remote) on calls that
would fail."""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from daybook.infrastructure.observability import metrics


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    #: The cool-down passed: one trial call is let through.
    HALF_OPEN = "half_open"


#: ``daybook_circuit_breaker_state``'s value for each state.
GAUGE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class CircuitBreaker:
    """Opens after ``threshold`` failures in a row; after ``cooldown`` seconds lets one trial
    call through, which closes it (success) or opens it again (failure). Its state is the
    gauge ``daybook_circuit_breaker_state{dependency=name}`` (one breaker per dependency in
    a process: with two, the last to change sets it).

    ``clock`` reads monotonic seconds (``time.monotonic``; injected by tests). A cooldown is
    an interval inside this process, never stored nor compared with another host: on the
    wall clock, NTP stepping it back by an hour held the breaker open for that hour, no
    call going out and orders reaching their payment deadlines with the remote healthy."""

    def __init__(
        self,
        name: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        threshold: int = 5,
        cooldown: float = 2.0,
    ) -> None:
        self.name = name
        self._clock = clock
        self.threshold = threshold
        self.cooldown = timedelta(seconds=cooldown)
        self._lock = threading.Lock()
        self._failures = 0
        self._state = BreakerState.CLOSED
        #: When it last opened, on ``clock``.
        self._opened_at: float | None = None
        self._trial = False
        #: How often it opened.
        self.opened = 0
        self._gauge = metrics.CIRCUIT_STATE.labels(name)
        self._gauge.set(GAUGE_VALUES[self._state])

    def _move(self, state: BreakerState) -> None:
        """Change state (holding the lock), and the gauge with it."""
        if state is not self._state:
            self._state = state
            self._gauge.set(GAUGE_VALUES[state])

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """May a call go out now?"""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN:
                assert self._opened_at is not None
                if self._clock() < self._opened_at + self.cooldown.total_seconds():
                    return False
                self._move(BreakerState.HALF_OPEN)
                self._trial = False
            if self._trial:
                return False  # one trial at a time
            self._trial = True
            return True

    def reopens_in(self) -> float | None:
        """In how many seconds an open breaker lets a trial through (0 once its cooldown
        has passed; None: it is not open)."""
        with self._lock:
            if self._state is not BreakerState.OPEN or self._opened_at is None:
                return None
            reopens = self._opened_at + self.cooldown.total_seconds()
            return max(0.0, reopens - self._clock())

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._move(BreakerState.CLOSED)
            self._trial = False

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN or self._failures >= self.threshold:
                if self._state is not BreakerState.OPEN:
                    self.opened += 1
                self._move(BreakerState.OPEN)
                self._opened_at = self._clock()
                self._trial = False
