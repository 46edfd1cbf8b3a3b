"""``memory://``: everything in process memory (tests, demos, embedding without disk)."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.popo import POPOApplicationRecorder, POPOFactory

from daybook.infrastructure.eventstore import completed, default_expiry
from daybook.infrastructure.ledger.conflicts import DuplicateRequest, VersionConflict
from daybook.infrastructure.ledger.requests import (
    Expiry,
    PendingRequest,
    PurgeReport,
    RequestRecord,
)


class MemoryRecorder(POPOApplicationRecorder):
    """eventsourcing's in-memory recorder plus request records, under the same lock."""

    def __init__(self) -> None:
        super().__init__()
        #: request id -> (record, expires at)
        self._requests: dict[str, tuple[RequestRecord, float]] = {}
        #: (expires at, request id), the soonest first: what the purge takes from.
        self._expiries: list[tuple[float, str]] = []

    def _insert_events(
        self,
        stored_events: Sequence[StoredEvent],
        *,
        requests: Sequence[PendingRequest] = (),
        expiry: Expiry | None = None,
        **kwargs: Any,
    ) -> Sequence[int] | None:
        expiry = expiry or default_expiry()
        with self._database_lock:
            ids = [r.record.request_id for r in requests]
            if len(set(ids)) < len(ids) or any(self._live(i, expiry.now) for i in ids):
                msg = f"request already recorded: {ids}"
                raise DuplicateRequest(msg)
            try:
                notification_ids = super()._insert_events(stored_events, **kwargs) or []
            except IntegrityError as error:  # the only uniqueness events have: versions
                raise VersionConflict(str(error)) from error
            for pending in requests:
                record = completed(pending, notification_ids)
                expires = expiry.of(record)
                self._requests[record.request_id] = (record, expires)
                heapq.heappush(self._expiries, (expires, record.request_id))
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


class Factory(POPOFactory):
    def application_recorder(self) -> MemoryRecorder:
        return MemoryRecorder()
