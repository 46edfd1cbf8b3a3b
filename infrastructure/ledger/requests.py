"""Idempotency records: what happened to each request, written with its events, kept for a
retention window.

A record of a request id the caller chose answers that caller's retries for ``retention``
(a setting): the same id and payload replay the original outcome, another payload is an
``idempotency_conflict``. After the window the id is new again.

An id the ledger generated serves only the ledger's own retry of a commit whose answer was
lost, and that retry holds the batch it sent: so such ids get no record each. A batch that
accepted any writes one record for all of them, its *batch token*, kept for
``GENERATED_RETENTION``. A retry looks the token up: found, the batch committed and its
receipts stand; not found, the retry's own transaction records the token as *fenced*, so
that the lost batch, if it is still on its way, fails on that key instead of committing
after the retry judged its commands again (``LedgerService.prepare``).

Expired records are deleted by the purge service (``retention.RequestPurge``) in small
batches; until then lookups ignore them, so when an id becomes new does not depend on when
the purge ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

#: How long the record of a caller-chosen request id is kept unless configured otherwise
#: (``Settings.request_retention``; the README says why three days).
DEFAULT_RETENTION = 72 * 3600.0

#: How long a batch token (the record of a batch's generated request ids) is kept. It is
#: needed while the ledger may still retry the commit it belongs to: ``LedgerService.execute``
#: gives up after at most ``max_attempts`` (40) attempts with backoffs under 50 ms, each
#: bounded by the store's lock and connection timeouts (30 s and 10 s): minutes at worst. An
#: hour leaves a wide margin.
GENERATED_RETENTION = 3600.0


@dataclass(frozen=True)
class RequestRecord:
    """What happened to a request: written in the same transaction as its events."""

    request_id: str
    command: str
    #: The command's ``fingerprint``; empty for a generated id (only the ledger's own retry,
    #: with the same command, can look it up).
    fingerprint: str
    #: ``{"receipt": {...}}`` or ``{"error": {...}}``.
    outcome: dict[str, Any]
    #: Whether the caller chose the request id (else the ledger generated it).
    caller: bool = True


#: The ``command`` of a batch token: the batch committed.
BATCH_TOKEN = "daybook.batch"
#: The ``command`` of a fenced token: the batch never committed, and now never will.
FENCED_TOKEN = "daybook.fenced"


def token_record(token: str, command: str) -> RequestRecord:
    """A batch token (``BATCH_TOKEN``) or a fence for one (``FENCED_TOKEN``)."""
    return RequestRecord(token, command, "", {}, caller=False)


@dataclass(frozen=True)
class PendingRequest:
    """A request record to write; the recorder fills in the receipt's log position from the
    notification id of the event at ``last_event_index`` (known only once inserted)."""

    record: RequestRecord
    last_event_index: int | None


@dataclass(frozen=True)
class Expiry:
    """When records written now expire (Unix seconds, from the ledger's clock)."""

    now: float
    caller: float
    generated: float

    def of(self, record: RequestRecord) -> float:
        return self.caller if record.caller else self.generated


@dataclass(frozen=True)
class PurgeReport:
    """What a purge would delete (or did): expired records, by kind."""

    caller: int = 0
    generated: int = 0
    #: Records not expired, kept.
    kept: int = 0
    #: The earliest and latest expiry among the expired ones (Unix seconds).
    oldest: float | None = None
    newest: float | None = None

    @property
    def expired(self) -> int:
        return self.caller + self.generated


@dataclass(frozen=True)
class RequestTable:
    """The request records' table as it stands, looked at without changing it."""

    #: Its columns; none: there is no table (no ledger has written to the database).
    columns: frozenset[str]
    #: How many records it holds, counted only when it predates expiry (a purge report
    #: counts the records of a table that has it).
    unmigrated: int = 0

    @property
    def exists(self) -> bool:
        return bool(self.columns)

    @property
    def predates_expiry(self) -> bool:
        """Written before records expired (daybook 0.2 and earlier): opening a ledger on it
        adds the expiry, one default window from then for every record already there."""
        return self.exists and "expires_at" not in self.columns


def utc(seconds: float) -> str:
    """Unix seconds as an ISO 8601 UTC time, for people."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


@runtime_checkable
class RequestLog(Protocol):
    """The part of the recorder that keeps idempotency records, and tells the ledger where
    aggregates stand after a refused write."""

    def select_requests(
        self, request_ids: Sequence[str], now: float | None = None
    ) -> dict[str, RequestRecord]:
        """The records of these ids not expired at ``now`` (None: all of them)."""
        ...

    def latest_versions(self, originator_ids: Sequence[UUID]) -> dict[UUID, int]:
        """The newest stored version of each of these aggregates (absent: none stored)."""
        ...

    def positions(self, keys: Sequence[tuple[UUID, int]]) -> dict[tuple[UUID, int], int]:
        """The log position of each stored event among ``keys`` (aggregate id, version)."""
        ...

    def purge_requests(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` records expired at ``now``, in one short transaction;
        how many were deleted."""
        ...

    def expired_requests(self, now: float) -> PurgeReport:
        """What ``purge_requests`` would delete at ``now``."""
        ...

    def database_time(self) -> float | None:
        """The database server's clock (Unix seconds); None where the store lives in the
        ledger's own process or host (memory, SQLite), whose clock is the ledger's."""
        ...

    def request_table(self) -> RequestTable:
        """The request records' table as it stands; only reads."""
        ...
