"""A circuit breaker per remote dependency: after repeated failures, stop calling it for a
while, so sagas wait for it instead of burning their attempts (and the remote) on calls that
would fail."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

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
    a process: with two, the last to change sets it)."""

    def __init__(
        self,
        name: str,
        clock: Callable[[], datetime],
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
        self._opened_at: datetime | None = None
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
                if self._clock() < self._opened_at + self.cooldown:
                    return False
                self._move(BreakerState.HALF_OPEN)
                self._trial = False
            if self._trial:
                return False  # one trial at a time
            self._trial = True
            return True

    def reopens_at(self) -> datetime | None:
        """When an open breaker lets a trial through (None: it is not open)."""
        with self._lock:
            if self._state is not BreakerState.OPEN or self._opened_at is None:
                return None
            return self._opened_at + self.cooldown

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
