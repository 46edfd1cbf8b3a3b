"""``sqlite:///path.db``: the embedded default, one file, no server."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteCursor, SQLiteFactory

from daybook.infrastructure.eventstore import (
    REQUESTS_TABLE,
    completed,
    decode_record,
    encode_outcome,
)
from daybook.infrastructure.ledger.requests import PendingRequest, RequestRecord


class SQLiteRecorder(SQLiteApplicationRecorder):
    """eventsourcing's SQLite recorder plus request records in the same transaction."""

    def construct_create_table_statements(self) -> list[str]:
        return [
            *super().construct_create_table_statements(),
            f"CREATE TABLE IF NOT EXISTS {REQUESTS_TABLE} ("
            "request_id TEXT PRIMARY KEY, command TEXT NOT NULL, "
            "fingerprint TEXT NOT NULL, outcome BLOB NOT NULL)",
        ]

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
            # SQLite caps bound parameters per statement; 500 stays well below every limit.
            for start in range(0, len(request_ids), 500):
                chunk = list(request_ids[start : start + 500])
                marks = ",".join("?" * len(chunk))
                c.execute(
                    f"SELECT request_id, command, fingerprint, outcome FROM {REQUESTS_TABLE} "
                    f"WHERE request_id IN ({marks})",
                    chunk,
                )
                for row in c.fetchall():
                    found[row[0]] = decode_record(row[0], row[1], row[2], row[3])
        return found


class Factory(SQLiteFactory):
    application_recorder_class = SQLiteRecorder
