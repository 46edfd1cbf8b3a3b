"""``memory://``: everything in process memory (tests, demos, embedding without disk)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.popo import POPOApplicationRecorder, POPOFactory

from daybook.infrastructure.eventstore import completed
from daybook.infrastructure.ledger.conflicts import DuplicateRequest, VersionConflict
from daybook.infrastructure.ledger.requests import PendingRequest, RequestRecord


class MemoryRecorder(POPOApplicationRecorder):
    """eventsourcing's in-memory recorder plus request records, under the same lock."""

    def __init__(self) -> None:
        super().__init__()
        self._requests: dict[str, RequestRecord] = {}

    def _insert_events(
        self,
        stored_events: Sequence[StoredEvent],
        *,
        requests: Sequence[PendingRequest] = (),
        **kwargs: Any,
    ) -> Sequence[int] | None:
        with self._database_lock:
            ids = [r.record.request_id for r in requests]
            if len(set(ids)) < len(ids) or any(i in self._requests for i in ids):
                msg = f"request already recorded: {ids}"
                raise DuplicateRequest(msg)
            try:
                notification_ids = super()._insert_events(stored_events, **kwargs) or []
            except IntegrityError as error:  # the only uniqueness events have: versions
                raise VersionConflict(str(error)) from error
            for pending in requests:
                self._requests[pending.record.request_id] = completed(pending, notification_ids)
            return notification_ids

    def select_requests(self, request_ids: Sequence[str]) -> dict[str, RequestRecord]:
        with self._database_lock:
            return {i: self._requests[i] for i in request_ids if i in self._requests}

    def latest_versions(self, originator_ids: Sequence[UUID]) -> dict[UUID, int]:
        found = {}
        for originator_id in originator_ids:
            latest = self.select_events(originator_id, desc=True, limit=1)
            if latest:
                found[originator_id] = latest[0].originator_version
        return found


class Factory(POPOFactory):
    def application_recorder(self) -> MemoryRecorder:
        return MemoryRecorder()
