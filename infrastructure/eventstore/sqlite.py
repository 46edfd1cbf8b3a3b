"""``sqlite:///path.db``: the embedded default, one file, no server."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteCursor, SQLiteFactory

from daybook.infrastructure.eventstore import (
    REQUESTS_TABLE,
    completed,
    decode_record,
    encode_outcome,
)
from daybook.infrastructure.ledger.conflicts import DuplicateRequest, VersionConflict
from daybook.infrastructure.ledger.requests import PendingRequest, RequestRecord

#: SQLite caps bound parameters per statement; 500 stays well below every limit.
_CHUNK = 500


class SQLiteRecorder(SQLiteApplicationRecorder):
    """eventsourcing's SQLite recorder plus request records in the same transaction."""

    def construct_create_table_statements(self) -> list[str]:
        return [
            *super().construct_create_table_statements(),
            f"CREATE TABLE IF NOT EXISTS {REQUESTS_TABLE} ("
            "request_id TEXT PRIMARY KEY, command TEXT NOT NULL, "
            "fingerprint TEXT NOT NULL, outcome BLOB NOT NULL)",
        ]

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        try:
            return super().insert_events(stored_events, **kwargs)
        except IntegrityError as error:
            # SQLite names the unique index that refused the row in its message.
            message = str(error)
            if f"{REQUESTS_TABLE}.request_id" in message:
                raise DuplicateRequest(message) from error
            if f"{self.events_table_name}.originator_id" in message:
                raise VersionConflict(message) from error
            raise

    def _insert_events(
        self,
        c: SQLiteCursor,
        stored_events: Sequence[StoredEvent],
        *,
        requests: Sequence[PendingRequest] = (),
        **kwargs: Any,
    ) -> Sequence[int] | None:
        notification_ids = super()._insert_events(c, stored_events, **kwargs) or []
        rows = []
        for pending in requests:
            record = completed(pending, notification_ids)
            rows.append(
                (record.request_id, record.command, record.fingerprint, encode_outcome(record))
            )
        if rows:
            c.executemany(f"INSERT INTO {REQUESTS_TABLE} VALUES (?, ?, ?, ?)", rows)
        return notification_ids

    def select_requests(self, request_ids: Sequence[str]) -> dict[str, RequestRecord]:
        if not request_ids:
            return {}
        found: dict[str, RequestRecord] = {}
        with self.datastore.transaction(commit=False) as c:
            for start in range(0, len(request_ids), _CHUNK):
                chunk = list(request_ids[start : start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                c.execute(
                    f"SELECT request_id, command, fingerprint, outcome FROM {REQUESTS_TABLE} "
                    f"WHERE request_id IN ({marks})",
                    chunk,
                )
                for row in c.fetchall():
                    found[row[0]] = decode_record(row[0], row[1], row[2], row[3])
        return found

    def latest_versions(self, originator_ids: Sequence[UUID]) -> dict[UUID, int]:
        found: dict[UUID, int] = {}
        with self.datastore.transaction(commit=False) as c:
            for start in range(0, len(originator_ids), _CHUNK):
                chunk = [i.hex for i in originator_ids[start : start + _CHUNK]]
                c.execute(
                    f"SELECT originator_id, MAX(originator_version) FROM {self.events_table_name} "
                    f"WHERE originator_id IN ({','.join('?' * len(chunk))}) GROUP BY originator_id",
                    chunk,
                )
                for originator_id, version in c.fetchall():
                    found[UUID(originator_id)] = version
        return found


class Factory(SQLiteFactory):
    application_recorder_class = SQLiteRecorder
