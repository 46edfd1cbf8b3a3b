"""Expiries: what is about to expire (``open_holds``), and the sweeper that records them.

A hold or a reservation stops counting the instant its timeout passes: the write side judges
that by the ledger's clock, so nothing here is needed for correctness. The sweeper writes the
record (``Hold.Expired``, ``Inventory.ReservationExpired``), which releases the row in the
read models and tells everyone downstream. It finds candidates in the ``open_holds`` read
model (eventually consistent: a candidate the ledger no longer considers open is refused and
skipped) and sends each expiry as a command without a request id of its own: the domain makes
it happen at most once (a hold resolves once; a second expiry is refused), and a refusal is
then not recorded, so a clock that runs a little ahead here cannot pin a "not expired yet"
answer to a request id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import MAXYEAR, UTC, datetime
from uuid import UUID

from daybook.domain.errors import DomainError, InvalidRequest
from daybook.domain.holds import ExpireHold
from daybook.domain.inventory import ExpireReservation
from daybook.domain.values import check_uuid, shown
from daybook.infrastructure.ledger.application import LedgerClosed, aware_clock
from daybook.infrastructure.ledger.facade import Ledger
from daybook.infrastructure.lifecycle import (
    Health,
    RestartPolicy,
    ServiceState,
    Stopping,
    SupervisedThread,
)
from daybook.infrastructure.observability import metrics
from daybook.infrastructure.readmodels.queries import Answer, ReadModels, StaleRead
from daybook.infrastructure.streaming.faults import crash_point
from daybook.projections.holds import EXPIRING_RESERVATIONS, OPEN_HOLDS, OPEN_HOLDS_PROJECTION
from daybook.projections.model import iso_time

log = logging.getLogger("daybook.expiry")

#: How long a sweeper whose read model another process builds waits for it to appear
#: before its health says it is stuck (``ExpirySweeper.patience``).
SWEEP_PATIENCE = 300.0

#: Refusals that mean "nothing to record now" (resolved meanwhile, not yet due by the
#: ledger's clock, or contended): the candidate is skipped.
_NOTHING_TO_DO = frozenset(
    {
        "hold_resolved",
        "hold_not_expired",
        "hold_not_found",
        "reservation_resolved",
        "reservation_not_expired",
        "reservation_not_found",
        "sku_not_found",
        # Other writers kept the aggregate busy past the ledger's retries: not now. The
        # candidate is still listed, and the next sweep sends it again.
        "concurrency_conflict",
    }
)


@dataclass(frozen=True)
class OpenHold:
    hold_id: UUID
    account_id: UUID
    destination: UUID | None
    amount: int
    currency: str
    expires_at: datetime
    placed_at: datetime


def open_holds(
    views: ReadModels,
    *,
    account_id: UUID | str | None = None,
    expiring_before: datetime | None = None,
    limit: int = 100,
    min_position: int | None = None,
    timeout: float = 2.0,
) -> Answer[list[OpenHold]]:
    """Open holds, soonest expiry first: of one account, or all; only those expiring before
    ``expiring_before`` if given. ``min_position`` and ``timeout`` as for every read."""
    clauses, params = [], []
    if account_id is not None:
        clauses.append("account_id = %s")
        params.append(str(check_uuid(account_id, "account_id")))
    if expiring_before is not None:
        if not isinstance(expiring_before, datetime) or expiring_before.utcoffset() is None:
            raise InvalidRequest(
                "expiring_before must be a datetime with a time zone (UTC, say), got "
                f"{shown(expiring_before)}",
                field="expiring_before",
            )
        try:
            bound = iso_time(expiring_before)
        except OverflowError:
            # The calendar's edge in a zone behind (or ahead of) UTC: past what UTC can
            # write. Every instant stored is before the one, none before the other.
            edge = datetime.max if expiring_before.year == MAXYEAR else datetime.min
            bound = iso_time(edge.replace(tzinfo=UTC))
        clauses.append("expires_at < %s")
        params.append(bound)
    answer = views.rows(
        OPEN_HOLDS_PROJECTION,
        OPEN_HOLDS.name,
        where=" AND ".join(clauses),
        params=params,
        order="expires_at, hold_id",
        limit=limit,
        min_position=min_position,
        timeout=timeout,
    )
    holds = [
        OpenHold(
            hold_id=UUID(str(row["hold_id"])),
            account_id=UUID(str(row["account_id"])),
            destination=None if row["destination"] is None else UUID(str(row["destination"])),
            amount=int(row["amount"] or 0),
            currency=str(row["currency"]),
            expires_at=datetime.fromisoformat(str(row["expires_at"])),
            placed_at=datetime.fromisoformat(str(row["placed_at"])),
        )
        for row in answer.value
    ]
    return Answer(holds, answer.as_of_position, answer.lag_events, answer.includes_later)


class ExpirySweeper:
    """Records the expiry of every hold and reservation whose timeout passed (a supervised
    service: ``start``, ``stop``, ``health``; or ``sweep`` once)."""

    def __init__(
        self,
        ledger: Ledger,
        views: ReadModels,
        *,
        clock: Callable[[], datetime] | None = None,
        interval: float = 1.0,
        batch: int = 500,
        policy: RestartPolicy | None = None,
        patience: float | None = None,
    ) -> None:
        self.ledger = ledger
        self.views = views
        self.clock = aware_clock(clock) if clock else ledger.service.clock
        self.interval = interval
        self.batch = batch
        #: Seconds the sweeper may wait for its read model to be built before its health
        #: says it is stuck (RETRYING). None: for ever, when this process builds it itself
        #: (a first build of a long log takes what it takes, and the runner's health tells).
        self.patience = patience
        self._waiting_since: float | None = None
        #: How many expiries this sweeper recorded.
        self.recorded = 0
        #: Whether the last sweep found a full page and got somewhere with it: more may be
        #: due, and the next sweep starts at once.
        self.more_due = False
        self.service = SupervisedThread("expiry sweeper", self._run, policy=policy)

    def sweep(self, stopping: Stopping | None = None) -> int:
        """Record the expiries due now (at most ``batch`` of each kind); how many. Ends
        after the expiry in hand once ``stopping`` is set: a page of a backlog is up to a
        thousand commands, each waiting for its commit, which a stop waited for."""
        due = iso_time(self.clock())
        recorded = 0
        holds = self.views.rows(
            OPEN_HOLDS_PROJECTION,
            OPEN_HOLDS.name,
            where="expires_at <= %s",
            params=[due],
            order="expires_at",
            limit=self.batch,
            timeout=0.0,  # not built yet: StaleRead at once (see _run)
        ).value
        for row in holds:
            if stopping:
                break
            recorded += self._record(ExpireHold(UUID(str(row["hold_id"]))))
        if recorded:
            metrics.HOLDS_EXPIRED.inc(recorded)
        if stopping:
            self.recorded += recorded
            self.more_due = False
            return recorded
        reservations = self.views.rows(
            OPEN_HOLDS_PROJECTION,
            EXPIRING_RESERVATIONS.name,
            where="expires_at <= %s",
            params=[due],
            order="expires_at",
            limit=self.batch,
            timeout=0.0,  # not built yet: StaleRead at once (see _run)
        ).value
        for row in reservations:
            if stopping:
                break
            command = ExpireReservation(str(row["sku"]), str(row["reservation_id"]))
            recorded += self._record(command)
        self.recorded += recorded
        # Counted from the page, not from this sweeper's records: beside another sweeper
        # (each `daybook serve` runs one), which records part of the same page first, this
        # one never recorded a full page, and both slept their interval with the backlog
        # still due. Not when it recorded nothing: a page it cannot act on (each expiry
        # refused) would have it sweep without pause.
        self.more_due = recorded > 0 and max(len(holds), len(reservations)) >= self.batch
        self._observe_open_holds()
        return recorded

    def _observe_open_holds(self) -> None:
        """Set ``daybook_holds_open`` from the ``open_holds`` read model: one count per sweep
        (the ledger keeps holds per account and has no total to ask). As current as the
        read model (its lag is ``daybook_projection_lag_events``): a hold this sweep
        expired is counted until its record is applied there."""
        counted = self.views.count(OPEN_HOLDS_PROJECTION, OPEN_HOLDS.name, timeout=0.0)
        metrics.HOLDS_OPEN.set(sum(counted.value.values()))

    def _record(self, command: ExpireHold | ExpireReservation) -> int:
        crash_point("expiry.before_record")
        try:
            self.ledger.execute(command)
        except DomainError as refusal:
            if refusal.code not in _NOTHING_TO_DO:
                raise
            return 0
        # Killed here, the expiry is recorded and the read model may still list it: the
        # next sweep sends it again and is refused (a hold or reservation resolves once).
        crash_point("expiry.after_record")
        return 1

    def _run(self, stopping: Stopping) -> None:
        while not stopping:
            try:
                self.sweep(stopping)
                full = self.more_due
            except LedgerClosed:
                if stopping:  # closed under a sweep its stop gave up waiting for
                    return
                raise
            except StaleRead as error:
                # The open_holds read model is not built yet (a first build may take a
                # while): say so, and look again. Not a failure at first (the ledger
                # already judges the expired as expired); past ``patience`` nobody seems
                # to be building it, and no expiry will ever be recorded: that is.
                if self._waiting_since is None:
                    self._waiting_since = time.monotonic()
                waited = time.monotonic() - self._waiting_since
                if self.patience is not None and waited > self.patience:
                    reason = f"nothing to sweep from after {waited:.0f} s: {error}"
                    self.service.supervisor.move(ServiceState.RETRYING, reason)
                else:
                    self.service.supervisor.move(ServiceState.RUNNING, f"waiting: {error}")
                full = False
            else:
                self._waiting_since = None
                self.service.supervisor.succeeded()
            if not full:
                stopping.wait(self.interval)

    def start(self) -> None:
        self.service.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        self.service.stop(timeout)

    def health(self) -> Health:
        return self.service.health()
