"""``memory://``: everything in process memory (tests, demos, embedding without disk)."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import AggregateRecorder, IntegrityError, StoredEvent
from eventsourcing.popo import POPOAggregateRecorder, POPOApplicationRecorder, POPOFactory

from daybook.infrastructure.eventstore import completed, default_expiry
from daybook.infrastructure.ledger.conflicts import DuplicateRequest, Read, VersionConflict
from daybook.infrastructure.ledger.requests import (
    Expiry,
    PendingRequest,
    PurgeReport,
    RequestRecord,
    RequestTable,
)


class MemoryRecorder(POPOApplicationRecorder):
    """eventsourcing's in-memory recorder plus request records, under the same lock."""

    def __init__(self) -> None:
        super().__init__()
        #: request id -> (record, expires at)
        self._requests: dict[str, tuple[RequestRecord, float]] = {}
        #: (expires at, request id), the soonest first: what the purge takes from.
        self._expiries: list[tuple[float, str]] = []
        #: Where snapshots go (the factory links the application's snapshot recorder).
        self.snapshot_recorder: LatestSnapshots | None = None

    def _insert_events(
        self,
        stored_events: Sequence[StoredEvent],
        *,
        requests: Sequence[PendingRequest] = (),
        expiry: Expiry | None = None,
        snapshots: Sequence[StoredEvent] = (),
        reads: Sequence[Read] = (),
        **kwargs: Any,
    ) -> Sequence[int] | None:
        expiry = expiry or default_expiry()
        with self._database_lock:
            ids = [r.record.request_id for r in requests]
            if len(set(ids)) < len(ids) or any(self._live(i, expiry.now) for i in ids):
                msg = f"request already recorded: {ids}"
                raise DuplicateRequest(msg)
            for aggregate_id, version, topics in reads:
                index = self._stored_events_index.get(str(aggregate_id), {})
                newer = version + 1  # versions have no gaps
                while newer in index:
                    if topics is None or self._stored_events[index[newer]].topic in topics:
                        msg = f"aggregate {aggregate_id} read at version {version} has moved on"
                        raise VersionConflict(msg)
                    newer += 1
            try:
                notification_ids = super()._insert_events(stored_events, **kwargs) or []
            except IntegrityError as error:  # the only uniqueness events have: versions
                raise VersionConflict(str(error)) from error
            for pending in requests:
                record = completed(pending, notification_ids)
                expires = expiry.of(record)
                self._requests[record.request_id] = (record, expires)
                heapq.heappush(self._expiries, (expires, record.request_id))
            if snapshots and self.snapshot_recorder is not None:
                self.snapshot_recorder.replace(snapshots)
            return notification_ids

    def _live(self, request_id: str, now: float | None) -> bool:
        entry = self._requests.get(request_id)
        return entry is not None and (now is None or entry[1] > now)

    def select_requests(
        self, request_ids: Sequence[str], now: float | None = None
    ) -> dict[str, RequestRecord]:
        with self._database_lock:
            return {i: self._requests[i][0] for i in request_ids if self._live(i, now)}

    def latest_versions(self, originator_ids: Sequence[UUID]) -> dict[UUID, int]:
        found = {}
        for originator_id in originator_ids:
            latest = self.select_events(originator_id, desc=True, limit=1)
            if latest:
                found[originator_id] = latest[0].originator_version
        return found

    def positions(self, keys: Sequence[tuple[UUID, int]]) -> dict[tuple[UUID, int], int]:
        found = {}
        with self._database_lock:
            for originator_id, version in keys:
                # The index maps a version to its place in the list; its position is one more.
                index = self._stored_events_index[str(originator_id)].get(version)
                if index is not None:
                    found[(originator_id, version)] = index + 1
        return found

    def purge_requests(self, now: float, limit: int) -> int:
        deleted = 0
        with self._database_lock:
            while deleted < limit and self._expiries and self._expiries[0][0] <= now:
                expires, request_id = heapq.heappop(self._expiries)
                entry = self._requests.get(request_id)
                if entry is not None and entry[1] == expires:  # not written again since
                    del self._requests[request_id]
                    deleted += 1
        return deleted

    def expired_requests(self, now: float) -> PurgeReport:
        with self._database_lock:
            expired = [(r, e) for r, e in self._requests.values() if e <= now]
            return PurgeReport(
                caller=sum(r.caller for r, _ in expired),
                generated=sum(not r.caller for r, _ in expired),
                kept=len(self._requests) - len(expired),
                oldest=min((e for _, e in expired), default=None),
                newest=max((e for _, e in expired), default=None),
            )

    def database_time(self) -> float | None:
        return None  # the ledger's own process

    def request_table(self) -> RequestTable:
        return RequestTable(_COLUMNS)


#: What a request record holds here (what the SQL stores' tables have as columns).
_COLUMNS = frozenset({"request_id", "command", "fingerprint", "outcome", "caller", "expires_at"})


class LatestSnapshots(POPOAggregateRecorder):
    """Snapshots, the latest of each aggregate only (an older one is never read again)."""

    def replace(self, snapshots: Sequence[StoredEvent]) -> None:
        with self._database_lock:
            for snapshot in snapshots:
                index = self._stored_events_index[str(snapshot.originator_id)]
                for version in list(index):
                    self._stored_events[index.pop(version)] = None  # type: ignore[call-overload]
            self._update_table(snapshots)


class Factory(POPOFactory):
    def application_recorder(self) -> MemoryRecorder:
        self._application = MemoryRecorder()
        return self._application

    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        if purpose != "snapshots":
            return super().aggregate_recorder(purpose)
        recorder = LatestSnapshots()
        application = getattr(self, "_application", None)
        if application is not None:
            application.snapshot_recorder = recorder
        return recorder
