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
from infrastructure.eventstore import REQUESTS_TABLE, decode_record, encode_outcome


class PostgresRecorder(PostgresApplicationRecorder):
    """eventsourcing's PostgreSQL recorder plus request records in the same transaction.

    A request record names its command's last event by (originator_id, originator_version)
    rather than by log position: the position is only known once the events are inserted,
    and waiting for it would cost a round trip per batch. The whole transaction is sent as
    one pipeline instead; a replay (rare) looks the position up with a join.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        schema = Identifier(self.datastore.schema)
        requests = SQL("{}.{}").format(schema, Identifier(REQUESTS_TABLE))
        events = SQL("{}.{}").format(schema, Identifier(self.events_table_name))
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                "request_id text PRIMARY KEY, command text NOT NULL, "
                "fingerprint text NOT NULL, outcome jsonb NOT NULL, "
                "last_originator_id uuid, last_originator_version bigint, "
                "recorded_at timestamptz NOT NULL DEFAULT now())"
            ).format(requests)
        )
        self._insert_requests = SQL(
            "INSERT INTO {} (request_id, command, fingerprint, outcome, "
            "last_originator_id, last_originator_version) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::jsonb[], "
            "%s::uuid[], %s::bigint[])"
        ).format(requests)
        self._select_requests = SQL(
            "SELECT r.request_id, r.command, r.fingerprint, r.outcome, e.notification_id "
            "FROM {} r LEFT JOIN {} e ON e.originator_id = r.last_originator_id "
            "AND e.originator_version = r.last_originator_version "
            "WHERE r.request_id = ANY(%s)"
        ).format(requests, events)

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
        error: Exception | None = None
        with self.datastore.get_connection() as conn:
            with conn.pipeline() as pipeline, conn.transaction():
                with conn.cursor() as curs:
                    # A receipt promises the events are on disk, whatever the server default.
                    curs.execute("SET LOCAL synchronous_commit = on")
                if requests:
                    with conn.cursor() as curs:
                        curs.execute(
                            self._insert_requests,
                            self._request_rows(stored_events, requests),
                            prepare=True,
                        )
                if stored_events:
                    with conn.cursor() as curs:
                        try:
                            # Locks the table, notifies listeners, inserts RETURNING ids.
                            self._insert_stored_events(curs, stored_events, **kwargs)
                            # Sync now so a duplicate key raises IntegrityError here
                            # rather than a pipeline error at commit.
                            pipeline.sync()
                            notification_ids = [row["notification_id"] for row in curs.fetchall()]
                        except Exception as e:  # re-raised once the pipeline has exited
                            error = e
            if error is not None:
                raise error
        return notification_ids

    @staticmethod
    def _request_rows(
        stored_events: Sequence[StoredEvent], requests: Sequence[PendingRequest]
    ) -> tuple[list[Any], ...]:
        last = [
            stored_events[p.last_event_index] if p.last_event_index is not None else None
            for p in requests
        ]
        return (
            [p.record.request_id for p in requests],
            [p.record.command for p in requests],
            [p.record.fingerprint for p in requests],
            [encode_outcome(p.record).decode() for p in requests],
            [e.originator_id if e else None for e in last],
            [e.originator_version if e else None for e in last],
        )

    def select_requests(self, request_ids: Sequence[str]) -> dict[str, RequestRecord]:
        if not request_ids:
            return {}
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_requests, (list(request_ids),), prepare=True)
            rows = curs.fetchall()
        found = {}
        for row in rows:
            record = decode_record(
                row["request_id"], row["command"], row["fingerprint"], row["outcome"]
            )
            if "receipt" in record.outcome:
                record.outcome["receipt"]["position"] = row["notification_id"]
            found[record.request_id] = record
        return found


class Factory(PostgresFactory):
    application_recorder_class = PostgresRecorder
