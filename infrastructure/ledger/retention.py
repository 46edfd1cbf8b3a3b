"""How long request records are kept, on whose clock, and the service that deletes them.

See ``daybook.infrastructure.ledger.requests`` for what a record promises and for how long.
The clock is injected (``Retention.clock``) so that tests and the model-based test can move
time; it reads Unix seconds, like ``time.time``. On the system clock, a purge on PostgreSQL
judges expiry by the database server's clock when that is behind (``ClockCheck``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from daybook.infrastructure.ledger.requests import (
    GENERATED_RETENTION,
    Expiry,
    PurgeReport,
    RequestLog,
)
from daybook.infrastructure.lifecycle import Health, Stopping, SupervisedThread
from daybook.infrastructure.streaming.faults import crash_point

#: Unix seconds now.
Clock = Callable[[], float]

#: How far (seconds) a purging host's clock may be off the database's, either way, before
#: the purge says so in its log.
AHEAD_TOLERANCE = 60.0

log = logging.getLogger("daybook.requests")


class ClockCheck:
    """The instant up to which a purge on a host whose system clock reads ``now`` deletes
    expired records (``purge_time``): ``now``, or the database server's clock if that is
    behind.

    A record's expiry is written on its writer's clock, and its writer may need it until
    then by that clock (a batch token, until the ledger's own retry of a batch whose answer
    was lost is over). Every ledger process purges, each on its own clock: one an hour or
    more ahead (a host keeping local time, at UTC+2) deleted tokens their writers still
    needed, and a retry then found none, took its batch for never committed and applied it
    again. Writers' clocks are assumed to agree with the database's (README, "Request
    records: retention and purge"), so the database's clock is the judge; a purger behind
    it deletes later, which costs only storage. Memory and SQLite answer no time of their
    own (one host, one clock): ``now`` is the judge there.

    It says in the log, once each time it starts, that this host's clock is off the
    database's by more than ``AHEAD_TOLERANCE``. Ahead, it is harmless now (the purge keeps
    to the database's clock) but its writes keep their records longer; behind, the batch
    tokens it writes expire early by the database's clock, and an hour behind, a purge
    anywhere may delete one while this host may still retry its batch, which would then be
    applied twice: the host that can do harm is told."""

    def __init__(self) -> None:
        #: The side the host's clock was last seen on: 1 ahead, -1 behind, 0 in step.
        self._side = 0

    def purge_time(self, requests: RequestLog, now: float) -> float:
        database = requests.database_time()
        if database is None:
            return now
        offset = now - database
        side = 1 if offset > AHEAD_TOLERANCE else -1 if offset < -AHEAD_TOLERANCE else 0
        if side == 0 and abs(offset) >= AHEAD_TOLERANCE / 2:
            side = self._side  # back in step only well within it: a clock hovering at the
            # tolerance is said to be off once, not at every other purge
        if side > 0 and self._side <= 0:
            log.warning(
                "this host's clock is %.0f s ahead of the database's: request records are "
                "purged by the database's clock, and this host's writes keep theirs that much "
                "longer; correct the host's clock",
                offset,
            )
        elif side < 0 and self._side >= 0:
            log.warning(
                "this host's clock is %.0f s behind the database's: the batch tokens this "
                "host writes expire that much early, and an hour behind, a batch whose answer "
                "was lost could be applied twice when retried; correct the host's clock",
                -offset,
            )
        self._side = side
        return min(now, database)


@dataclass(frozen=True)
class Retention:
    """Records of caller-chosen request ids are kept ``caller`` seconds after they were
    written; batch tokens (one per batch, for its generated ids) ``generated`` seconds."""

    caller: float
    generated: float = GENERATED_RETENTION
    clock: Clock = field(default=time.time, compare=False)
    #: ``clock`` is the host's system clock (the ledger's default), so a purge is held to
    #: the database's clock (``ClockCheck``). False for a clock a test injects: its time is
    #: one the database's clock knows nothing of (1970, or days ahead), and judges alone.
    system_clock: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        if self.caller < self.generated:
            msg = (
                f"the request retention window ({self.caller:g} s) must be at least as long "
                f"as the ledger keeps its own retries' records ({self.generated:g} s)"
            )
            raise ValueError(msg)

    def expiry(self) -> Expiry:
        """When records written now expire."""
        now = self.clock()
        return Expiry(now, now + self.caller, now + self.generated)


class RequestPurge:
    """Deletes expired request records, ``batch`` rows per transaction (so no lock is held
    for long and writers are never kept waiting), as long as there are any, then every
    ``interval`` seconds. A supervised service: a lost connection is retried with backoff,
    anything else stops it as ``failed``, logged and visible in ``health()``."""

    def __init__(
        self,
        requests: RequestLog,
        retention: Retention,
        *,
        interval: float = 60.0,
        batch: int = 1_000,
        guard: Callable[[], None] | None = None,
    ) -> None:
        """``guard`` is called before each purge, and may refuse it (a ledger's purge in a
        child forked after the ledger was opened)."""
        self._requests = requests
        self._guard = guard
        self._retention = retention
        self.interval = interval
        self.batch = batch
        #: Records deleted since the service started.
        self.deleted = 0
        self._clock_check = ClockCheck()
        self._service = SupervisedThread("daybook-request-purge", self._run)

    def start(self) -> None:
        self._service.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        self._service.stop(timeout)

    def health(self) -> Health:
        return self._service.health()

    def purge(
        self,
        *,
        stopping: Stopping | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete every record expired now, batch by batch; how many. ``progress`` is told
        how many so far after each batch."""
        if self._guard is not None:
            self._guard()
        deleted = 0
        now = self._now()
        while not stopping:
            count = self._requests.purge_requests(now, self.batch)
            deleted += count
            self.deleted += count
            # Each batch commits alone: killed between batches, the next purge deletes the
            # rest (lookups ignore an expired record already, whether or not it is gone).
            crash_point("purge.after_batch")
            if progress is not None:
                progress(deleted)
            if count < self.batch:
                break
        if deleted:
            log.info("deleted %d expired request records", deleted)
        return deleted

    def report(self) -> PurgeReport:
        """What ``purge`` would delete now."""
        return self._requests.expired_requests(self._now())

    def _now(self) -> float:
        """The instant a purge now deletes up to (see ``ClockCheck``)."""
        now = self._retention.clock()
        if not self._retention.system_clock:
            return now
        return self._clock_check.purge_time(self._requests, now)

    def _run(self, stopping: Stopping) -> None:
        while not stopping:
            self.purge(stopping=stopping)
            self._service.supervisor.succeeded()
            stopping.wait(self.interval)
