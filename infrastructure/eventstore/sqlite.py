"""``sqlite:///path.db``: the embedded default, one file, no server."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, OperationalError, StoredEvent
from eventsourcing.sqlite import (
    SQLiteApplicationRecorder,
    SQLiteCursor,
    SQLiteFactory,
)

from daybook.infrastructure.compat.eventsourcing import query_only_pool, switch_pool_to_wal
from daybook.infrastructure.eventstore import (
    REQUESTS_TABLE,
    UPGRADE_RETENTION,
    completed,
    decode_record,
    default_expiry,
    encode_outcome,
)
from daybook.infrastructure.ledger.conflicts import DuplicateRequest, Read, VersionConflict
from daybook.infrastructure.ledger.requests import (
    Expiry,
    PendingRequest,
    PurgeReport,
    RequestRecord,
    RequestTable,
)
from daybook.infrastructure.sqlite_files import BUSY_TIMEOUT
from daybook.infrastructure.urls import READ_ONLY_KEY

#: SQLite caps bound parameters per statement; 500 stays well below every limit.
_CHUNK = 500
_FOREVER = float("inf")


class SQLiteRecorder(SQLiteApplicationRecorder):
    """eventsourcing's SQLite recorder plus request records and snapshots in the same
    transaction."""

    #: The snapshot table eventsourcing's factory creates for the application's snapshots.
    snapshots_table = "stored_snapshots"

    def construct_create_table_statements(self) -> list[str]:
        return [
            *super().construct_create_table_statements(),
            f"CREATE TABLE IF NOT EXISTS {REQUESTS_TABLE} ("
            "request_id TEXT PRIMARY KEY, command TEXT NOT NULL, "
            "fingerprint TEXT NOT NULL, outcome BLOB NOT NULL, "
            "caller INTEGER NOT NULL DEFAULT 1, expires_at REAL NOT NULL DEFAULT 0)",
        ]

    def create_table(self) -> None:
        """Create and migrate the tables in one transaction, tried again while another
        connection migrates the file: a transaction that has read the schema (as the
        migration's checks do) is refused the write lock at once, "database is locked",
        not after the busy timeout, when another writes it first (processes starting
        together on a file an older daybook wrote). Rolled back, the next try finds the
        columns there."""
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            try:
                super().create_table()
                return
            except OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def _create_table(self, c: SQLiteCursor) -> None:
        super()._create_table(c)
        # A table written before records expired lacks the two columns: its records get
        # one default window from now (SQLite adds a column with a constant default).
        c.execute(f"PRAGMA table_info({REQUESTS_TABLE})")
        columns = {row[1] for row in c.fetchall()}
        if "caller" not in columns:
            c.execute(f"ALTER TABLE {REQUESTS_TABLE} ADD COLUMN caller INTEGER NOT NULL DEFAULT 1")
        if "expires_at" not in columns:
            until = time.time() + UPGRADE_RETENTION
            c.execute(
                f"ALTER TABLE {REQUESTS_TABLE} "
                f"ADD COLUMN expires_at REAL NOT NULL DEFAULT {until!r}"
            )
        c.execute(
            f"CREATE INDEX IF NOT EXISTS {REQUESTS_TABLE}_expires_at "
            f"ON {REQUESTS_TABLE} (expires_at)"
        )

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
        expiry: Expiry | None = None,
        snapshots: Sequence[StoredEvent] = (),
        reads: Sequence[Read] = (),
        **kwargs: Any,
    ) -> Sequence[int] | None:
        notification_ids = super()._insert_events(c, stored_events, **kwargs) or []
        # After the insert, which took the database's write lock: no other writer can
        # commit before this transaction ends, so what is read now stays the latest.
        for aggregate_id, version, topics in reads:
            # Of the events since, only those that change what was judged (see ``reads``).
            of_topics = "" if topics is None else f" AND topic IN ({', '.join('?' * len(topics))})"
            c.execute(
                f"SELECT 1 FROM {self.events_table_name} "
                f"WHERE originator_id = ? AND originator_version > ?{of_topics} LIMIT 1",
                (aggregate_id.hex, version, *(topics or ())),
            )
            if c.fetchone() is not None:
                msg = f"aggregate {aggregate_id} read at version {version} has moved on"
                raise VersionConflict(msg)
        for snapshot in snapshots:  # only the latest of each aggregate is ever read
            originator_id = snapshot.originator_id.hex  # type: ignore[union-attr]
            c.execute(
                f"DELETE FROM {self.snapshots_table} WHERE originator_id = ?", (originator_id,)
            )
            c.execute(
                f"INSERT INTO {self.snapshots_table} VALUES (?, ?, ?, ?)",
                (originator_id, snapshot.originator_version, snapshot.topic, snapshot.state),
            )
        if not requests:
            return notification_ids
        expiry = expiry or default_expiry()
        # A caller's id whose record expired is new again: its old row makes way.
        reused = [p.record.request_id for p in requests if p.record.caller]
        for start in range(0, len(reused), _CHUNK):
            chunk = reused[start : start + _CHUNK]
            c.execute(
                f"DELETE FROM {REQUESTS_TABLE} WHERE expires_at <= ? "
                f"AND request_id IN ({','.join('?' * len(chunk))})",
                [expiry.now, *chunk],
            )
        rows = []
        for pending in requests:
            record = completed(pending, notification_ids)
            rows.append(
                (
                    record.request_id,
                    record.command,
                    record.fingerprint,
                    encode_outcome(record),
                    int(record.caller),
                    expiry.of(record),
                )
            )
        c.executemany(f"INSERT INTO {REQUESTS_TABLE} VALUES (?, ?, ?, ?, ?, ?)", rows)
        return notification_ids

    def select_requests(
        self, request_ids: Sequence[str], now: float | None = None
    ) -> dict[str, RequestRecord]:
        if not request_ids:
            return {}
        found: dict[str, RequestRecord] = {}
        with self.datastore.transaction(commit=False) as c:
            for start in range(0, len(request_ids), _CHUNK):
                chunk = list(request_ids[start : start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                c.execute(
                    "SELECT request_id, command, fingerprint, outcome, caller "
                    f"FROM {REQUESTS_TABLE} WHERE request_id IN ({marks}) AND expires_at > ?",
                    [*chunk, -_FOREVER if now is None else now],
                )
                for row in c.fetchall():
                    found[row[0]] = decode_record(row[0], row[1], row[2], row[3], row[4])
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

    def positions(self, keys: Sequence[tuple[UUID, int]]) -> dict[tuple[UUID, int], int]:
        found: dict[tuple[UUID, int], int] = {}
        with self.datastore.transaction(commit=False) as c:
            for originator_id, version in keys:  # rare (a retry's lookup): one query each
                c.execute(
                    f"SELECT rowid FROM {self.events_table_name} "
                    "WHERE originator_id = ? AND originator_version = ?",
                    (originator_id.hex, version),
                )
                row = c.fetchone()
                if row is not None:
                    found[(originator_id, version)] = int(row[0])
        return found

    def purge_requests(self, now: float, limit: int) -> int:
        # The oldest first, through the expires_at index; one short write transaction.
        with self.datastore.transaction(commit=True) as c:
            c.execute(
                f"DELETE FROM {REQUESTS_TABLE} WHERE rowid IN (SELECT rowid FROM "
                f"{REQUESTS_TABLE} WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)",
                (now, limit),
            )
            c.execute("SELECT changes()")
            return int(c.fetchone()[0])

    def expired_requests(self, now: float) -> PurgeReport:
        with self.datastore.transaction(commit=False) as c:
            c.execute(
                "SELECT SUM(expires_at <= ? AND caller), SUM(expires_at <= ? AND NOT caller), "
                "SUM(expires_at > ?), MIN(expires_at), "
                f"MAX(CASE WHEN expires_at <= ? THEN expires_at END) FROM {REQUESTS_TABLE}",
                (now, now, now, now),
            )
            caller, generated, kept, oldest, newest = c.fetchone()
        expired = bool(caller or generated)
        return PurgeReport(
            caller=caller or 0,
            generated=generated or 0,
            kept=kept or 0,
            oldest=oldest if expired else None,
            newest=newest,
        )

    def database_time(self) -> float | None:
        return None  # a file on the ledger's own host

    def request_table(self) -> RequestTable:
        with self.datastore.transaction(commit=False) as c:
            c.execute(f"PRAGMA table_info({REQUESTS_TABLE})")
            columns = frozenset(str(row[1]) for row in c.fetchall())
            unmigrated = 0
            if columns and "expires_at" not in columns:
                c.execute(f"SELECT count(*) FROM {REQUESTS_TABLE}")
                unmigrated = int(c.fetchone()[0])
        return RequestTable(columns, unmigrated)


class Factory(SQLiteFactory):
    application_recorder_class = SQLiteRecorder

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        if self.env.get(READ_ONLY_KEY):
            given = self.datastore.pool
            self.datastore.pool = query_only_pool(given.db_name, given.lock_timeout)
            given.close()
        else:
            switch_pool_to_wal(self.datastore.pool)
