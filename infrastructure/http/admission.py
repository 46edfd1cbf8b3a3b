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
be allowed. Requests of commands that reduce risk are not counted, unless they reduce nothing
(``RateLimits.take``). All of this runs on the event loop's thread (no locks needed).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    #: Per token: its exempt requests that reduced nothing (``take``).
    _wasted: dict[str, Bucket] = field(default_factory=dict)
    limited: int = 0

    def take(self, name: str, rate: float | None = None, *, exempt: bool = False) -> None:
        """Count one request for ``name``; raise 429 when over its rate.

        ``exempt``: a request made only of commands that reduce risk. It is not counted:
        a caller at its limit must still be able to release what it holds, however many
        such requests it has in flight. Unless such requests reduce nothing: each one whose
        every command is refused, or that cannot be read (``wasted``), is counted in a
        bucket of their own, which may go into debt (requests sent together are all let in,
        and counted as they end), and while it owes more than one burst the token's exempt
        requests are refused as any other. So a token cannot send, for long, more requests
        that reduce nothing (each leaving request records for the retention window) than
        its rate."""
        limit = self._limit(rate)
        if limit is None:
            return
        per_second, burst = limit
        bucket = self._filled(self._wasted if exempt else self._buckets, name, per_second, burst)
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
        if not exempt:
            bucket.tokens -= 1.0

    def wasted(self, name: str, rate: float | None = None) -> None:
        """A request ``take`` let in as ``exempt`` reduced nothing: count it (see ``take``)."""
        limit = self._limit(rate)
        if limit is not None:
            self._filled(self._wasted, name, *limit).tokens -= 1.0

    @contextmanager
    def wasted_if_refused(self, name: str, rate: float | None, exempt: bool) -> Iterator[None]:
        """Count an ``exempt`` request as ``wasted`` if it ends refused for the caller's
        reason (a 4xx: a refusal, a body that cannot be read, a key used for another
        request); not for the server's (shutting down, an outage)."""
        try:
            yield
        except Problem as problem:
            if exempt and problem.status < 500:
                self.wasted(name, rate)
            raise

    def _limit(self, rate: float | None) -> tuple[float, float] | None:
        """(requests a second, burst) for a token of ``rate`` (None: the server's); None when
        it has no limit."""
        per_second = rate or self.default_rate
        if per_second <= 0:
            return None
        return per_second, max(1.0, per_second * self.burst_seconds)

    def _filled(
        self, buckets: dict[str, Bucket], name: str, per_second: float, burst: float
    ) -> Bucket:
        """``name``'s bucket, with the tokens it earned since it was last seen."""
        now = self.clock()
        bucket = buckets.get(name)
        if bucket is None:
            bucket = buckets[name] = Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * per_second)
        bucket.stamp = now
        return bucket
