"""Backpressure: bounded admission in front of the committer and the read pool, and per-token
rate limits.

Without a bound, a flood of requests becomes an ever longer queue: every caller waits longer,
times out, retries, and the retries join the queue. Here each door admits a fixed number of
requests at a time; past it a request is refused at once with ``503 overloaded`` and a
``Retry-After`` worked out from the backlog and the rate the door has been draining at (with
jitter, so refused callers do not all return in the same second). Commands that reduce risk
(``Command.reduces_risk``: releasing a reservation, voiding a hold, cancelling, compensating)
are always admitted: shedding them would keep exposure open under exactly the load that makes
it dangerous.

Rate limits are token buckets per bearer token: ``rate`` requests a second, bursts up to
``burst``. Over the limit: ``429 rate_limited`` with the seconds until the next request would
be allowed. All of this runs on the event loop's thread (no locks needed).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from daybook.infrastructure.http.problems import Problem

#: Longest Retry-After handed out, in seconds.
MAX_RETRY_AFTER = 60


@dataclass
class DrainRate:
    """Completions per second, as an exponentially weighted average over about ``window``
    seconds."""

    window: float = 2.0
    clock: Callable[[], float] = time.monotonic
    _rate: float = 0.0
    _count: int = 0
    _since: float = field(default=-1.0)

    def done(self) -> None:
        now = self.clock()
        if self._since < 0:
            self._since = now
        self._count += 1
        elapsed = now - self._since
        if elapsed >= 0.1:  # fold in tenths of a second: a steady figure, cheap to keep
            weight = min(1.0, elapsed / self.window)
            self._rate += weight * (self._count / elapsed - self._rate)
            self._count, self._since = 0, now

    @property
    def per_second(self) -> float:
        return self._rate


@dataclass
class Door:
    """At most ``capacity`` requests inside at once; ``enter`` refuses the next one."""

    name: str
    capacity: int
    rate: DrainRate = field(default_factory=DrainRate)
    draw: Callable[[float, float], float] = random.uniform
    inside: int = 0
    #: Refused since start (for status and tests).
    shed: int = 0
    admitted: int = 0

    def enter(self, *, always: bool = False) -> None:
        if self.inside >= self.capacity and not always:
            self.shed += 1
            raise Problem(
                "overloaded",
                f"the {self.name} queue is full ({self.inside} in progress); retry later",
                headers={"Retry-After": str(self.retry_after())},
                details={"in_progress": self.inside, "capacity": self.capacity},
            )
        self.inside += 1
        self.admitted += 1

    def leave(self) -> None:
        self.inside -= 1
        self.rate.done()

    def retry_after(self) -> int:
        """Seconds until the backlog ahead of a new request should have drained, with up to
        50% jitter; 1 to ``MAX_RETRY_AFTER``."""
        rate = self.rate.per_second
        backlog = self.inside - self.capacity + 1
        base = backlog / rate if rate > 0 else 1.0
        return max(1, min(MAX_RETRY_AFTER, math.ceil(base * self.draw(1.0, 1.5))))


@dataclass
class Bucket:
    tokens: float
    stamp: float


@dataclass
class RateLimits:
    """Token buckets, one per bearer token name."""

    default_rate: float
    burst_seconds: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, Bucket] = field(default_factory=dict)
    limited: int = 0

    def take(self, name: str, rate: float | None = None, *, exempt: bool = False) -> None:
        """Count one request for ``name``; raise 429 when over its rate.

        ``exempt``: a request made only of commands that reduce risk, let in over the rate
        (down to one burst below empty) so that a caller at its limit can still release what
        it holds. Counted on the way in all the same, so that requests sent together are
        bounded too, and given back (``refund``) once it has reduced something: one that
        reduces nothing (a void of a hold that does not exist releases nothing, and leaves a
        request record for the retention window) stays counted, and a token sending such
        requests without end is limited as for any other."""
        per_second = rate or self.default_rate
        if per_second <= 0:
            return  # no limit
        burst = max(1.0, per_second * self.burst_seconds)
        bucket = self._filled(name, per_second, burst)
        needed = 1.0 - burst if exempt else 1.0
        if bucket.tokens < needed:
            self.limited += 1
            wait = math.ceil((needed - bucket.tokens) / per_second)
            raise Problem(
                "rate_limited",
                f"this token may send {per_second:g} requests a second; retry later",
                headers={"Retry-After": str(max(1, wait))},
                details={"rate": per_second},
            )
        bucket.tokens -= 1.0

    def refund(self, name: str, rate: float | None = None) -> None:
        """Give back what ``take(exempt=True)`` counted: the request reduced risk."""
        per_second = rate or self.default_rate
        if per_second <= 0:
            return
        burst = max(1.0, per_second * self.burst_seconds)
        bucket = self._filled(name, per_second, burst)
        bucket.tokens = min(burst, bucket.tokens + 1.0)

    def _filled(self, name: str, per_second: float, burst: float) -> Bucket:
        """``name``'s bucket, with the tokens it earned since it was last seen."""
        now = self.clock()
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * per_second)
        bucket.stamp = now
        return bucket
