"""``postgresql://...``: the production store.

Events go through eventsourcing's PostgreSQL recorder, which locks the events table for each
insert so that notification ids are issued in commit order and a tailing reader never passes
a gap that fills in later. Do not enable POSTGRES_ENABLE_DB_FUNCTIONS: that path skips the
lock, and tailing readers then miss events.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresFactory
from psycopg.sql import SQL, Identifier

from domain.ledger import PendingRequest, RequestRecord
from infrastructure.eventstore import REQUESTS_TABLE, completed, decode_record, encode_outcome


class PostgresRecorder(PostgresApplicationRecorder):
    """eventsourcing's PostgreSQL recorder plus request records in the same transaction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        table = SQL("{}.{}").format(Identifier(self.datastore.schema), Identifier(REQUESTS_TABLE))
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                "request_id text PRIMARY KEY, command text NOT NULL, "
                "fingerprint text NOT NULL, outcome jsonb NOT NULL, "
                "recorded_at timestamptz NOT NULL DEFAULT now())"
            ).format(table)
        )
        self._insert_requests = SQL(
            "INSERT INTO {} (request_id, command, fingerprint, outcome) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::jsonb[])"
        ).format(table)
        self._select_requests = SQL(
            "SELECT request_id, command, fingerprint, outcome FROM {} WHERE request_id = ANY(%s)"
        ).format(table)

    def insert_events(
        self,
        stored_events: Sequence[StoredEvent],
        *,
        requests: Sequence[PendingRequest] = (),
        **kwargs: Any,
    ) -> Sequence[int] | None:
        # No automatic retry here (unlike the base class): after a lost connection the
        # commit may or may not have happened, and only the ledger can tell, by looking up
        # the batch's request ids before applying anything again.
        notification_ids: list[int] = []
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            if stored_events:
                # Locks the table, notifies listeners, inserts with RETURNING notification_id.
                self._insert_stored_events(curs, stored_events, **kwargs)
                notification_ids = [row["notification_id"] for row in curs.fetchall()]
            if requests:
                records = [completed(p, notification_ids) for p in requests]
                curs.execute(
                    self._insert_requests,
                    (
                        [r.request_id for r in records],
                        [r.command for r in records],
                        [r.fingerprint for r in records],
                        [encode_outcome(r).decode() for r in records],
                    ),
                    prepare=True,
                )
        return notification_ids

    def select_requests(self, request_ids: Sequence[str]) -> dict[str, RequestRecord]:
        if not request_ids:
            return {}
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_requests, (list(request_ids),), prepare=True)
            return {
                row["request_id"]: decode_record(
                    row["request_id"], row["command"], row["fingerprint"], row["outcome"]
                )
                for row in curs.fetchall()
            }


class Factory(PostgresFactory):
    application_recorder_class = PostgresRecorder
