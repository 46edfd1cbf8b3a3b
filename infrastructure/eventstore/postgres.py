"""``postgresql://...``: the production store.

Events go through eventsourcing's PostgreSQL recorder, which locks the events table for each
insert so that notification ids are issued in commit order and a tailing reader never passes
a gap that fills in later. Do not enable POSTGRES_ENABLE_DB_FUNCTIONS: that path skips the
lock, and tailing readers then miss events.
"""

from __future__ import annotations

import contextlib
import hashlib
from binascii import b2a_base64
from collections.abc import Sequence
from datetime import timedelta
from typing import Any
from uuid import UUID

import orjson
import psycopg
from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.postgres import (
    PostgresAggregateRecorder,
    PostgresApplicationRecorder,
    PostgresFactory,
)
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier, Literal

from daybook.infrastructure.compat.eventsourcing import (
    reconnect_promptly,
    retried_only_at_once,
    set_on_each_session,
)
from daybook.infrastructure.eventstore import (
    REQUESTS_TABLE,
    UPGRADE_RETENTION,
    decode_record,
    default_expiry,
)
from daybook.infrastructure.eventstore.identity import CREATE_TABLES_LOCK
from daybook.infrastructure.eventstore.identity import create_statements as identity_statements
from daybook.infrastructure.ledger.conflicts import (
    DuplicateRequest,
    PositionsBehind,
    Read,
    VersionConflict,
)
from daybook.infrastructure.ledger.requests import (
    Expiry,
    PendingRequest,
    PurgeReport,
    RequestRecord,
    RequestTable,
)
from daybook.infrastructure.own_schema import IN_OWN_SCHEMA
from daybook.infrastructure.urls import READ_ONLY_KEY, SERVER_LIVENESS, SETTINGS_KEY, BadURL


def events_channel(schema: str) -> str:
    """The NOTIFY channel a ledger's commits wake its readers on. Channels are the
    database's, not a schema's: a ledger in a schema of its own has a channel of its own,
    or every ledger's commit would wake every other's readers. ``public`` keeps the name
    it always had, so that its writers and readers of two versions still hear each other
    during a rolling upgrade. (PostgreSQL cuts a name at 63 bytes, the same way when
    notifying and listening: two long schema names alike in their first 48 share a channel,
    which costs a spurious wake and nothing else.)"""
    return EVENTS_TABLE if schema == "public" else f"{EVENTS_TABLE}_{schema}"


class SnapshotRecorder(PostgresAggregateRecorder):
    """eventsourcing's recorder of snapshots, its reads bounded as the ledger's are."""

    select_events = retried_only_at_once(PostgresAggregateRecorder.select_events)


class PostgresRecorder(PostgresApplicationRecorder):
    """eventsourcing's PostgreSQL recorder plus request records in the same transaction.

    A request record names its command's last event by (originator_id, originator_version)
    rather than by log position: the position is only known once the events are inserted,
    and the records and the events go to the server in one call (a replay, which is rare,
    looks the position up with a join).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channel_name = events_channel(self.datastore.schema)
        schema = Identifier(self.datastore.schema)
        requests = SQL("{}.{}").format(schema, Identifier(REQUESTS_TABLE))
        self._requests_table = requests
        events = SQL("{}.{}").format(schema, Identifier(self.events_table_name))
        # The table eventsourcing's factory creates for the application's snapshots.
        prefix = self.events_table_name.removesuffix("_events")
        self._snapshots_table_name = f"{prefix}_snapshots"
        snapshots = SQL("{}.{}").format(schema, Identifier(self._snapshots_table_name))
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                "request_id text PRIMARY KEY, command text NOT NULL, "
                "fingerprint text NOT NULL, outcome jsonb NOT NULL, "
                "last_originator_id uuid, last_originator_version bigint, "
                "recorded_at timestamptz NOT NULL DEFAULT now(), "
                "caller boolean NOT NULL DEFAULT true, expires_at timestamptz NOT NULL)"
            ).format(requests)
        )
        # A table written before records expired lacks the two columns: its records get one
        # default window from the upgrade (a constant default: no table rewrite). Checked
        # first, so that starting a process takes no lock on the table.
        self.sql_create_statements.append(
            SQL(
                "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM information_schema.columns "
                "WHERE table_schema = {schema} AND table_name = {table} "
                "AND column_name = 'expires_at') THEN "
                "ALTER TABLE {requests} ADD COLUMN IF NOT EXISTS caller boolean NOT NULL "
                "DEFAULT true, ADD COLUMN expires_at timestamptz NOT NULL "
                "DEFAULT (now() + {window}); "
                "END IF; END $$"
            ).format(
                schema=Literal(self.datastore.schema),
                table=Literal(REQUESTS_TABLE),
                requests=requests,
                window=Literal(timedelta(seconds=UPGRADE_RETENTION)),
            )
        )
        self.sql_create_statements.append(
            SQL("CREATE INDEX IF NOT EXISTS {} ON {} (expires_at)").format(
                Identifier(f"{REQUESTS_TABLE}_expires_at"), requests
            )
        )
        # The store's identity, which the relay names in what it publishes.
        self.sql_create_statements.extend(identity_statements(self.datastore.schema))
        # Marks a log opened by a daybook that follows the search_path (see _schema_of).
        self.sql_create_statements.append(
            SQL("CREATE TABLE IF NOT EXISTS {}.{} (since timestamptz DEFAULT now())").format(
                schema, Identifier(FOLLOWED_TABLE)
            )
        )
        # One server-side function appends a whole batch: request records, then the table
        # lock, the notification and the events. The client makes a single call instead of
        # eight statements, and sends the batch as one JSON document (events' states in
        # base64) rather than ten arrays: psycopg dumps arrays element by element in Python,
        # which was most of the client time of a group commit; orjson writes the document in
        # a few microseconds. The table lock keeps notification ids in commit order (see the
        # module docstring); json_to_recordset yields rows in document order, so the ids come
        # back in the order of the events. A caller's request id whose record has expired is
        # new again: its old row is deleted first, in the same transaction. ``reads`` are the
        # aggregates the batch's commands judged without changing them, each at its version:
        # checked under the table lock (every writer takes it before inserting, so no other
        # batch can commit events until this one ends), a newer version refuses the batch as
        # a version conflict (a unique violation on the events table, as a changed aggregate
        # meets). Checked only when there are some: an empty array costs a length test.
        lock_timeout = self.datastore.lock_timeout
        body = (
            SQL(
                "(events json, requests json, reused json, now double precision, "
                "snapshots json, reads json) "
                "RETURNS SETOF bigint LANGUAGE plpgsql AS $BODY$ "
                "BEGIN "
                # A receipt promises the events are on disk, whatever the server default.
                "PERFORM set_config('synchronous_commit', 'on', true); "
                # Only the latest snapshot of an aggregate is ever read: the new one
                # replaces the older.
                "IF json_array_length(snapshots) > 0 THEN "
                "DELETE FROM {snapshots} s USING json_to_recordset(snapshots) AS n(i uuid) "
                "WHERE s.originator_id = n.i; "
                "INSERT INTO {snapshots} (originator_id, originator_version, topic, state) "
                "SELECT i, v, t, decode(s, 'base64') FROM json_to_recordset(snapshots) "
                "AS n(i uuid, v bigint, t text, s text); "
                "END IF; "
                "IF json_array_length(reused) > 0 THEN "
                "DELETE FROM {requests} WHERE expires_at <= to_timestamp(now) "
                "AND request_id IN (SELECT json_array_elements_text(reused)); "
                "END IF; "
                "IF json_array_length(requests) > 0 THEN "
                "INSERT INTO {requests} (request_id, command, fingerprint, outcome, "
                "last_originator_id, last_originator_version, caller, expires_at) "
                "SELECT request_id, command, fingerprint, outcome, last_originator_id, "
                "last_originator_version, caller, to_timestamp(expires_at) "
                "FROM json_to_recordset(requests) AS r(request_id text, command text, "
                "fingerprint text, outcome jsonb, last_originator_id uuid, "
                "last_originator_version bigint, caller boolean, expires_at double precision); "
                "END IF; "
                "IF json_array_length(events) > 0 THEN "
                # The check of ``reads`` below must see what committed while this waited
                # for the lock: a statement's own snapshot under READ COMMITTED, the
                # transaction's first one under REPEATABLE READ or SERIALIZABLE. daybook's
                # sessions are READ COMMITTED (``Factory``); this guards against any other.
                "IF current_setting('transaction_isolation') <> 'read committed' THEN "
                "RAISE EXCEPTION 'daybook writes need READ COMMITTED transactions, and this "
                "session''s are %: set default_transaction_isolation to ''read committed'' "
                "for daybook''s role or database', current_setting('transaction_isolation') "
                "USING ERRCODE = 'feature_not_supported'; "
                "END IF; "
                "PERFORM set_config('lock_timeout', {lock_timeout}, true); "
                "LOCK TABLE {events_table} IN EXCLUSIVE MODE; "
                "IF json_array_length(reads) > 0 AND EXISTS (SELECT 1 FROM "
                "json_to_recordset(reads) AS r(i uuid, v bigint, t text) JOIN {events_table} e "
                "ON e.originator_id = r.i AND e.originator_version > r.v "
                "AND (r.t IS NULL OR e.topic = r.t)) THEN "
                "RAISE EXCEPTION 'an aggregate the batch read has a newer version' "
                "USING ERRCODE = 'unique_violation', TABLE = {events_name}; "
                "END IF; "
                "NOTIFY {channel}; "
                "RETURN QUERY INSERT INTO {events_table} "
                "(originator_id, originator_version, topic, state) "
                "SELECT i, v, t, decode(s, 'base64') FROM json_to_recordset(events) "
                "AS e(i uuid, v bigint, t text, s text) "
                "RETURNING notification_id; "
                "END IF; "
                "END $BODY$"
            ).format(
                requests=requests,
                snapshots=snapshots,
                events_table=events,
                events_name=Literal(self.events_table_name),
                channel=Identifier(self.channel_name),
                lock_timeout=Literal(f"{lock_timeout}s"),
            )
        ).as_string(None)
        # Named after its body: every process creates its function at start, and under one
        # name an older process starting during a rolling deploy (or a rollback) replaced
        # the newer body with its own, which every newer process's writes then ran (lacking
        # what the newer code relies on) until each restarted. A body of its own per code:
        # the digest first, so that a long table name, cut at 63 bytes, never cuts it.
        digest = hashlib.sha256(body.encode()).hexdigest()[:12]
        self._append_function = Identifier(f"daybook_append_{digest}_{self.events_table_name}")
        self.sql_create_statements.append(
            SQL("CREATE OR REPLACE FUNCTION {}.{}").format(schema, self._append_function)
            + SQL(body)
        )
        self._append = SQL(
            "SELECT * FROM {}.{}(%s::json, %s::json, %s::json, %s, %s::json, %s::json) "
            "AS notification_id"
        ).format(schema, self._append_function)
        self._select_requests = SQL(
            "SELECT r.request_id, r.command, r.fingerprint, r.outcome, r.caller, "
            "e.notification_id "
            "FROM {} r LEFT JOIN {} e ON e.originator_id = r.last_originator_id "
            "AND e.originator_version = r.last_originator_version "
            "WHERE r.request_id = ANY(%s) AND r.expires_at > to_timestamp(%s)"
        ).format(requests, events)
        self._latest_versions = SQL(
            "SELECT originator_id, max(originator_version) FROM {} "
            "WHERE originator_id = ANY(%s) GROUP BY originator_id"
        ).format(events)
        self._positions = SQL(
            "SELECT e.originator_id, e.originator_version, e.notification_id FROM {} e "
            "JOIN unnest(%s::uuid[], %s::bigint[]) AS k(i, v) "
            "ON e.originator_id = k.i AND e.originator_version = k.v"
        ).format(events)
        # The oldest first, through the expires_at index; rows another purge is deleting
        # are skipped rather than waited for. One statement: a short transaction.
        self._purge = SQL(
            "DELETE FROM {0} WHERE request_id IN (SELECT request_id FROM {0} "
            "WHERE expires_at <= to_timestamp(%s) ORDER BY expires_at LIMIT %s "
            "FOR UPDATE SKIP LOCKED)"
        ).format(requests)
        self._expired = SQL(
            "SELECT count(*) FILTER (WHERE expires_at <= to_timestamp(%(now)s) AND caller), "
            "count(*) FILTER (WHERE expires_at <= to_timestamp(%(now)s) AND NOT caller), "
            "count(*) FILTER (WHERE expires_at > to_timestamp(%(now)s)), "
            "extract(epoch FROM min(expires_at)), "
            "extract(epoch FROM max(expires_at) FILTER "
            "(WHERE expires_at <= to_timestamp(%(now)s))) FROM {}"
        ).format(requests)

    select_events = retried_only_at_once(PostgresApplicationRecorder.select_events)
    select_notifications = retried_only_at_once(PostgresApplicationRecorder.select_notifications)
    max_notification_id = retried_only_at_once(PostgresApplicationRecorder.max_notification_id)

    def create_table(self) -> None:
        # Several processes may start at once on a fresh database, and PostgreSQL does not
        # serialise concurrent CREATE TYPE / CREATE OR REPLACE FUNCTION on the same object
        # ("tuple concurrently updated"): take turns, with a session advisory lock held on a
        # connection of its own.
        # Each statement is then a transaction of its own, unlike the base class's one for
        # all: CREATE INDEX IF NOT EXISTS locks its table in SHARE mode even when the index
        # exists, and held to the end of one transaction, the events table's lock would wait
        # for the request records' table while a write, which holds that table, waits for
        # the events table: 'deadlock detected', for the start or the write. One lock at a
        # time cannot close a cycle. Every statement is idempotent, so a start that dies
        # half-way is completed by the next.
        with self.datastore.get_connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (CREATE_TABLES_LOCK,))
            try:
                for statement in self.sql_create_statements:
                    with (
                        self.datastore.transaction(commit=True) as curs,
                        # A type has no IF NOT EXISTS (the base class suppresses it too).
                        contextlib.suppress(psycopg.errors.DuplicateObject),
                    ):
                        curs.execute(statement, prepare=False)
                self.datastore.register_type_adapters()
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (CREATE_TABLES_LOCK,))

    def insert_events(
        self,
        stored_events: Sequence[StoredEvent],
        *,
        requests: Sequence[PendingRequest] = (),
        expiry: Expiry | None = None,
        snapshots: Sequence[StoredEvent] = (),
        reads: Sequence[Read] = (),
        **kwargs: Any,
    ) -> Sequence[int] | None:
        # No automatic retry here (unlike the base class): after a lost connection the
        # commit may or may not have happened, and only the ledger can tell, by looking up
        # the batch's request ids before applying anything again.
        # The batch is one call of the append function on an autocommit connection: the
        # statement is its own transaction, so the whole batch commits or none of it, in one
        # round trip and one fsync. A duplicate key (another writer got there first) fails
        # the statement with IntegrityError and nothing commits. Once the call is sent, the
        # server commits it even if this process dies before the answer arrives; the batch's
        # request records then make every retry a replay. (Explicit BEGIN and COMMIT round
        # trips, or psycopg's pipeline mode, cost the group commit more than they save.)
        try:
            with (
                self.datastore.get_connection() as conn,
                conn.cursor(row_factory=tuple_row) as curs,
            ):
                self._append_batch(
                    curs, stored_events, requests, expiry or default_expiry(), snapshots, reads
                )
                # The call was the cursor's only statement: its rows are the new ids, in order.
                return [notification_id for (notification_id,) in curs.fetchall()]
        except IntegrityError as error:
            cause = error.__cause__
            if isinstance(cause, psycopg.errors.UniqueViolation):
                table = cause.diag.table_name
                if table == REQUESTS_TABLE:
                    raise DuplicateRequest(str(error)) from cause
                # A position drawn twice: the detail names the key's columns in every
                # language the server may answer in ("Key (notification_id)=(3) ...").
                if "(notification_id)=" in (cause.diag.message_detail or ""):
                    raise PositionsBehind(self._positions_behind(cause)) from cause
                # Another writer's batch took an aggregate across a snapshot boundary from
                # the same version, and committed first: its snapshot row is the first key
                # this batch meets (snapshots are written before the events).
                if table in (self.events_table_name, self._snapshots_table_name):
                    raise VersionConflict(str(error)) from cause
            raise

    def _positions_behind(self, cause: psycopg.Error) -> str:
        table = f"{self.datastore.schema or 'public'}.{self.events_table_name}"
        return (
            f"the event store's position sequence is behind its log ({cause.diag.message_detail}"
            "): the events table was restored without its sequence's state. Nothing was "
            "written. Move the sequence past the log, then retry: SELECT setval("
            f"pg_get_serial_sequence('{table}', 'notification_id'), "
            f"(SELECT max(notification_id) FROM {table}))"
        )

    def _append_batch(
        self,
        curs: Any,
        stored_events: Sequence[StoredEvent],
        requests: Sequence[PendingRequest],
        expiry: Expiry,
        snapshots: Sequence[StoredEvent] = (),
        reads: Sequence[Read] = (),
    ) -> None:
        events = _rows(stored_events)
        records = []
        for pending in requests:
            record = pending.record
            index = pending.last_event_index
            last = stored_events[index] if index is not None else None
            records.append(
                {
                    "request_id": record.request_id,
                    "command": record.command,
                    "fingerprint": record.fingerprint,
                    "outcome": record.outcome,
                    "last_originator_id": last.originator_id if last else None,
                    "last_originator_version": last.originator_version if last else None,
                    "caller": record.caller,
                    "expires_at": expiry.of(record),
                }
            )
        reused = [pending.record.request_id for pending in requests if pending.record.caller]
        curs.execute(
            self._append,
            (
                orjson.dumps(events, default=bytes.decode).decode(),
                orjson.dumps(records).decode(),
                orjson.dumps(reused).decode(),
                expiry.now,
                orjson.dumps(_rows(snapshots), default=bytes.decode).decode(),
                orjson.dumps(_reads(reads)).decode() if reads else "[]",
            ),
            prepare=True,
        )

    def select_requests(
        self, request_ids: Sequence[str], now: float | None = None
    ) -> dict[str, RequestRecord]:
        if not request_ids:
            return {}
        since = float("-inf") if now is None else now
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._select_requests, (list(request_ids), since), prepare=True)
            rows = curs.fetchall()
        found = {}
        for row in rows:
            record = decode_record(
                row["request_id"], row["command"], row["fingerprint"], row["outcome"], row["caller"]
            )
            if "receipt" in record.outcome:
                record.outcome["receipt"]["position"] = row["notification_id"]
            found[record.request_id] = record
        return found

    def latest_versions(self, originator_ids: Sequence[UUID]) -> dict[UUID, int]:
        if not originator_ids:
            return {}
        with self.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(self._latest_versions, (list(originator_ids),), prepare=True)
            return {originator_id: version for originator_id, version in curs.fetchall()}

    def positions(self, keys: Sequence[tuple[UUID, int]]) -> dict[tuple[UUID, int], int]:
        if not keys:
            return {}
        with self.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(self._positions, ([i for i, _ in keys], [v for _, v in keys]))
            return {(i, v): position for i, v, position in curs.fetchall()}

    def purge_requests(self, now: float, limit: int) -> int:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self._purge, (now, limit), prepare=True)
            return int(curs.rowcount)

    def database_time(self) -> float | None:
        with self.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as curs:
            curs.execute("SELECT extract(epoch FROM now())")
            row = curs.fetchone()
        assert row is not None
        return float(row[0])

    def expired_requests(self, now: float) -> PurgeReport:
        with self.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(self._expired, {"now": now})
            row = curs.fetchone()
        assert row is not None  # an aggregate query answers one row
        caller, generated, kept, oldest, newest = row
        expired = bool(caller or generated)
        return PurgeReport(
            caller=caller,
            generated=generated,
            kept=kept,
            oldest=float(oldest) if expired and oldest is not None else None,
            newest=float(newest) if newest is not None else None,
        )

    def request_table(self) -> RequestTable:
        with self.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s",
                (self.datastore.schema, REQUESTS_TABLE),
            )
            columns = frozenset(str(name) for (name,) in curs.fetchall())
            unmigrated = 0
            if columns and "expires_at" not in columns:
                curs.execute(SQL("SELECT count(*) FROM {}").format(self._requests_table))
                row = curs.fetchone()
                assert row is not None  # an aggregate query answers one row
                unmigrated = int(row[0])
        return RequestTable(columns, unmigrated)


def _rows(stored: Sequence[StoredEvent]) -> list[dict[str, Any]]:
    """Stored events as the append function reads them (states in base64)."""
    return [
        {
            "i": e.originator_id,
            "v": e.originator_version,
            "t": e.topic,
            "s": b2a_base64(e.state, newline=False),
        }
        for e in stored
    ]


#: Seconds the pool keeps trying to replace a lost connection (see ``Factory``).
RECONNECT_TIMEOUT = 30.0


class Factory(PostgresFactory):
    application_recorder_class = PostgresRecorder
    aggregate_recorder_class = SnapshotRecorder

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        # eventsourcing gives the pool's connections where and who only: add the URL's libpq
        # settings (TCP liveness and connect_timeout above all: see urls.TCP_LIVENESS).
        kwargs = self.datastore.pool.kwargs
        assert isinstance(kwargs, dict)  # eventsourcing builds its pool with a dict
        kwargs.update(conninfo_to_dict(self.env.get(SETTINGS_KEY) or ""))
        # The append function checks what a batch only read under the lock every writer
        # takes, and must see what committed while it waited: a statement's own snapshot,
        # which only READ COMMITTED gives. Set on each of daybook's own sessions (after the
        # URL's options, so it wins), rather than refusing a server, database or role whose
        # default is stricter: daybook's guarantees do not come from the isolation level.
        # A SET once connected, not a startup option: a pooler in between refuses those.
        settings = ["SET default_transaction_isolation = 'read committed'", SERVER_LIVENESS]
        if self.env.get(READ_ONLY_KEY):
            # Every transaction read-only: the server refuses any write (see read_only_env).
            settings.append("SET default_transaction_read_only = on")
        set_on_each_session(self.datastore, settings)
        # psycopg_pool replaces a lost connection with attempts whose delays double (1, 2,
        # 4, 8, 16 s...) until ``reconnect_timeout`` has passed (5 minutes by default), then
        # gives the slot up (the next caller that waits grows the pool again). After an
        # outage of 15 s the next attempt could be 16 s away while the server is back, every
        # command meanwhile answered ``unavailable``: the delay is capped at a second
        # (reconnect_promptly), and the attempts stop after 30 s rather than 5 minutes (each
        # failed one logs a warning; a caller's wait starts them again).
        reconnect_promptly(self.datastore)
        self.datastore.pool.reconnect_timeout = RECONNECT_TIMEOUT
        # eventsourcing qualifies every name with its POSTGRES_SCHEMA, "public" unless set:
        # a URL's search_path (options=-csearch_path=...) or a role's was ignored, so two
        # ledgers in two schemas of one database wrote one log, and a role that may create
        # only in its own schema could not open a ledger. The session's own schema decides,
        # as it does for the read models and every other unqualified name daybook uses.
        try:
            self.datastore.schema = _schema_of(self.datastore)
        except BaseException:
            self.datastore.close()  # its pool's threads and connections, at once
            raise


#: The ledger's events table (eventsourcing names it after the application, ``daybook``).
EVENTS_TABLE = "daybook_events"

#: Made beside the events table by every daybook that follows the search_path: a log in
#: ``public`` without it was written by one that did not (see ``_schema_of``).
FOLLOWED_TABLE = "daybook_search_path_followed"


class SchemaRefused(BadURL):
    """The event store's schema cannot be used as it stands; the message says why and what
    would work."""

    code = "bad_url"


def _schema_of(datastore: Any) -> str:
    """The schema the event store's tables live in: the first schema of the session's
    search_path that exists (``current_schema()``)."""
    with datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as curs:
        curs.execute(
            f"SELECT current_schema(), {IN_OWN_SCHEMA}, "
            "to_regclass(%s), quote_ident(current_schema()) = current_schema(), "
            "to_regclass(%s) IS NOT NULL",
            (EVENTS_TABLE, f"public.{EVENTS_TABLE}", f"public.{FOLLOWED_TABLE}"),
        )
        row = curs.fetchone()
    schema, here, in_public, plain, followed = row if row is not None else (None,) * 5
    if schema is None:
        raise SchemaRefused(
            "the PostgreSQL event store: its search_path names no schema that exists (the "
            "URL's options=-csearch_path=..., or the role's); create the schema, or fix the "
            "search_path"
        )
    if not plain:
        # eventsourcing names its row types by the schema unquoted ("schema.type"), so a
        # name that needs quoting (capitals, a dash, a reserved word such as "order") is a
        # syntax error, or another schema's type, at the first connection.
        raise SchemaRefused(
            f"the PostgreSQL event store: the search_path puts daybook's tables in schema "
            f"{schema!r}, whose name needs quoting; name the schema with lower-case letters, "
            "digits and underscores, not starting with a digit and not a reserved word such "
            "as order or user (or add options=-csearch_path%3Dpublic to the URL)"
        )
    if schema != "public" and here is None and in_public is not None and not followed:
        # Before daybook followed the search_path, a ledger kept its event store in public
        # whatever the search_path said (and its read models and tokens in the
        # search_path's schema): opening a new, empty log here would hide that one (every
        # account "not found"). A log in public that a daybook following the search_path
        # opened (its marker table) is a ledger of public's own: this schema's is new.
        raise SchemaRefused(
            f"the PostgreSQL event store: the search_path puts daybook's tables in schema "
            f"{schema!r}, which has none, while schema 'public' holds a daybook log (written "
            "before daybook followed the search_path, while its read models and tokens "
            f"followed it, into {schema!r} if any). To go on with that log, stop every "
            "process of the older daybook (given this URL after the move, it would start a "
            "new, empty log in 'public'), then move the log's tables (daybook_events, "
            "daybook_requests, daybook_snapshots, daybook_store), types and "
            f"functions into {schema!r} (ALTER ... SET SCHEMA); or, if the read models and "
            "tokens are in 'public' too, add options=-csearch_path%3Dpublic to the URL. (A "
            "new ledger beside it in this schema opens once the one in 'public' has been "
            "opened by this version of daybook with options=-csearch_path%3Dpublic.)"
        )
    return str(schema)


def _reads(reads: Sequence[Read]) -> list[dict[str, Any]]:
    """``reads`` for the append function: a row per topic that makes a read stale (one
    without a topic: any event does)."""
    return [
        {"i": i, "v": v, "t": t}
        for i, v, topics in reads
        for t in (topics if topics is not None else (None,))
    ]
