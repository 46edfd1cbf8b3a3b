"""Read models in PostgreSQL (psycopg 3): batch writes as arrays and binary COPY, advisory
locks, checksums computed by the server."""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import suppress
from typing import Any

import psycopg

from daybook.infrastructure.own_schema import IN_OWN_SCHEMA
from daybook.infrastructure.readmodels import checksums
from daybook.infrastructure.readmodels.store import ReadStore, WriterLocks, read_row
from daybook.infrastructure.urls import keep_server_probing, postgres_params
from daybook.projections.model import Key, Row, Table, Value

#: Binary COPY type names of the column types.
_BINARY_TYPES = {"text": "text", "bigint": "int8", "numeric": "numeric"}


def _connect(conninfo: str) -> psycopg.Connection[tuple[Any, ...]]:
    # Autocommit: transactions are always explicit (see ``ReadStore.transaction``).
    conn = psycopg.connect(conninfo, autocommit=True)  # connect_timeout: the URL's (urls.py)
    try:
        keep_server_probing(conn)  # it may hold locks others wait for (urls.SERVER_LIVENESS)
    except BaseException:
        conn.close()
        raise
    return conn


class AdvisoryLocks(WriterLocks):
    """Session advisory locks on a connection of their own: they hold while it lives, and
    PostgreSQL releases them when it dies with its process."""

    between_processes = True

    def __init__(self, conninfo: str) -> None:
        self.conn = _connect(conninfo)
        # Advisory locks are the database's, not a schema's: read models kept in another
        # schema of the same database (the URL's or the role's search_path) are another
        # set of versions, whose writers must not wait for these. Each schema's runners,
        # ``public``'s too, take a key of their schema's exclusively, and the plain key an
        # older runner takes (whatever its schema) shared: one held exclusively by a runner
        # in ``public`` would keep every other schema's runners standing by for ever.
        row = self.conn.execute("SELECT current_schema()").fetchone()
        schema = row[0] if row else None
        self._schema = str(schema) if schema else "public"

    def _key(self, key: int) -> int:
        digest = hashlib.blake2b(f"{self._schema}:{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=True)

    def try_take(self, key: int, *, shared: bool = False) -> bool:
        # An older runner (a rolling upgrade) takes the plain key, whatever the schema:
        # held shared here, it keeps that runner standing by while this one writes, and
        # this one while it does; runners of every schema share it with this one.
        row = self.conn.execute("SELECT pg_try_advisory_lock_shared(%s)", (key,)).fetchone()
        if not (row and row[0]):
            return False
        function = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
        row = self.conn.execute(f"SELECT {function}(%s)", (self._key(key),)).fetchone()
        taken = bool(row and row[0])
        if not taken:
            self.conn.execute("SELECT pg_advisory_unlock_shared(%s)", (key,))
        return taken

    def release(self, key: int) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (self._key(key),))
        self.conn.execute("SELECT pg_advisory_unlock_shared(%s)", (key,))

    def held_elsewhere(self, key: int) -> bool:
        # A runner of this version holds its schema's key; an older one, the plain key
        # exclusively. (A bigint key shows in pg_locks as classid, its high half, and objid.)
        row = self.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objsubid = 1 AND pid <> pg_backend_pid()"
            " AND (((classid::bigint << 32) | objid::bigint) = %s"
            "  OR (((classid::bigint << 32) | objid::bigint) = %s AND mode = 'ExclusiveLock')))",
            (self._key(key), key),
        ).fetchone()
        return bool(row and row[0])

    def check(self) -> None:
        self.conn.execute("SELECT 1")

    def close(self) -> None:
        with suppress(Exception):
            self.conn.close()


class PostgresStore(ReadStore):
    def __init__(self, url: str) -> None:
        self.url = url
        self.conninfo = postgres_params(url).conninfo()
        self.conn = _connect(self.conninfo)
        self._stages: set[str] = set()

    def close(self) -> None:
        with suppress(Exception):
            self.conn.close()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cursor:
            cursor.execute(sql, params or None)
            return cursor.fetchall() if cursor.description else []

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(sql, rows)

    def control(self, sql: str) -> None:
        # Never prepared: psycopg prepares a statement at its fifth run, sending the Parse
        # alone and the statement only once the Parse's reply is in. A COMMIT gains nothing
        # from a plan, and that way it would cost a round trip more, once per connection;
        # unprepared, the COMMIT is one message, sent whole, whatever happens to the reply.
        self.conn.execute(sql, prepare=False)

    # -- dialect -----------------------------------------------------------------------------

    def lock_transaction(self, key: int) -> None:
        self.execute("SELECT pg_advisory_xact_lock(%s)", (key,))

    def has_unique_key(self, name: str) -> bool:
        rows = self.execute(
            f"SELECT {IN_OWN_SCHEMA} IS NOT NULL OR {IN_OWN_SCHEMA} IS NOT NULL",
            (f"{name}_pkey", f"{name}_key"),
        )
        return bool(rows[0][0])

    def wait_for_locks_at_most(self, seconds: float | None) -> None:
        if seconds is None:
            self.execute("SET LOCAL lock_timeout TO DEFAULT")
        else:
            self.execute(f"SET LOCAL lock_timeout = {int(seconds * 1000)}")

    def open_locks(self) -> AdvisoryLocks:
        return AdvisoryLocks(self.conninfo)

    def serial_key(self) -> str:
        return "id BIGSERIAL PRIMARY KEY"

    def locking(self, select: str) -> str:
        return f"{select} FOR UPDATE"

    def sharing(self, select: str) -> str:
        return f"{select} FOR SHARE"

    def head_position(self) -> int | None:
        rows = self.execute(f"SELECT {IN_OWN_SCHEMA} IS NOT NULL", ("daybook_events",))
        if not rows[0][0]:
            return None
        return int(
            self.execute("SELECT COALESCE(max(notification_id), 0) FROM daybook_events")[0][0]
        )

    def add_column(self, table: str, definition: str) -> None:
        # Asked first: ALTER TABLE takes the table's exclusive lock even when the column is
        # there, and every reader and runner ensures the catalog when it connects.
        if not self.has_column(table, definition.split()[0]):
            self.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {definition}")

    def has_column(self, table: str, name: str) -> bool:
        return bool(
            self.execute(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()"
                " AND table_name = %s AND column_name = %s",
                (table, name),
            )
        )

    def lock_not_granted(self, error: BaseException) -> bool:
        return isinstance(error, psycopg.errors.LockNotAvailable)

    def create_unique_index(self, table: str, index: str, columns: Sequence[str]) -> None:
        # Workers of one stream group may switch a version at the same moment, and both
        # build its key: PostgreSQL lets two transactions build the same index, and fails
        # the second (once the first commits) with a unique violation in its own catalog,
        # which would read as rows that repeat a key. That one finds the index built and
        # goes on. (No lock taken first: ``register`` takes the DDL lock before a catalog
        # row, and a switch's callers may already hold the row.)
        self.execute("SAVEPOINT daybook_create_key")
        try:
            super().create_unique_index(table, index, columns)
        except psycopg.errors.UniqueViolation as error:
            self.execute("ROLLBACK TO SAVEPOINT daybook_create_key")
            if error.diag.constraint_name != "pg_class_relname_nsp_index" or not (
                self.has_unique_key(table)
            ):
                raise
        self.execute("RELEASE SAVEPOINT daybook_create_key")

    def refused_rows(self, error: BaseException) -> bool:
        # A value past 64 bits in a binary COPY (the bulk path) never reaches the server:
        # the driver refuses to encode it (OverflowError from psycopg's C implementation,
        # struct.error from its pure-Python one), where a parameter the server parses says
        # "out of range" (DataError). The rows' fault either way.
        return isinstance(
            error,
            psycopg.errors.IntegrityError | psycopg.errors.DataError | OverflowError | struct.error,
        )

    def is_missing_table(self, error: BaseException) -> bool:
        return isinstance(error, psycopg.errors.UndefinedTable)

    def is_missing_column(self, error: BaseException) -> bool:
        return isinstance(error, psycopg.errors.UndefinedColumn)

    # -- reconciling: the same figures as ``checksums``, computed by the server --------------

    def range_checksums(self, table: Table, version: int) -> dict[str, tuple[int, int]]:
        key_text, row_text = _joined_text(table.key), _joined_text(table.column_names)
        rows = self.execute(
            f"SELECT substr(md5({key_text}), 1, 2), count(*),"
            f" sum(('x' || substr(md5({row_text}), 1, 15))::bit(60)::bigint)"
            f" FROM {self.source(table, version)} GROUP BY 1"
        )
        return {bucket: (int(count), int(total)) for bucket, count, total in rows}

    def rows_in_ranges(self, table: Table, version: int, ranges: set[str]) -> dict[Key, Row]:
        where = f"substr(md5({_joined_text(table.key)}), 1, 2) = ANY(%s)"
        rows = self.select(table, version, where, [sorted(ranges)])
        return {table.key_of(row): row for row in rows}

    def rows_by_range(
        self, table: Table, version: int, ranges: set[str]
    ) -> Iterator[tuple[str, dict[Key, Row]]]:
        # One pass, ordered by range through a server-side cursor: a range is an md5 of the
        # key, which no index serves, so a query per range read the whole table each time
        # (drift spread over a table: 256 passes to compare, as many to repair).
        wanted = sorted(ranges)
        if not wanted:
            return
        names = table.column_names
        of_key = f"substr(md5({_joined_text(table.key)}), 1, 2)"
        sql = (
            f'SELECT {of_key} COLLATE "C", {", ".join(names)} FROM {self.source(table, version)}'
            f" WHERE {of_key} = ANY(%s) ORDER BY 1"
        )
        # Inside the caller's transaction, the cursor reads its snapshot; outside any (the
        # fold's scratch store), WITH HOLD, as a transaction of its own. (Not a transaction
        # opened here: a generator left unfinished would end it after its caller's.)
        name = f"daybook_ranges_{next(_CURSORS)}"
        outside = self._depth == 0
        with self.conn.cursor(name=name, withhold=outside) as cursor:
            cursor.itersize = _RANGE_ROWS_PER_FETCH
            cursor.execute(sql, [wanted])
            pending = iter(wanted)
            rows: dict[Key, Row] = {}
            current = next(pending)
            for values in cursor:
                found = str(values[0])
                while found != current:  # ranges without rows come out empty
                    yield current, rows
                    current, rows = next(pending), {}
                row = read_row(table, values[1:])
                rows[table.key_of(row)] = row
            yield current, rows
            for each in pending:
                yield each, {}

    # -- writing rows --------------------------------------------------------------------------

    def upsert(self, table: Table, version: int, rows: Sequence[Row]) -> None:
        if not rows:
            return
        # One statement for the whole batch: each column travels as one array.
        names = table.column_names
        casts = ", ".join(f"%s::{c.type}[]" for c in table.columns)
        columns = [[row[n] for row in rows] for n in names]
        self.execute(
            f"INSERT INTO {table.physical_name(version)} ({', '.join(names)})"
            f" SELECT * FROM unnest({casts}) {_on_conflict(table)}",
            columns,
        )

    def insert(self, table: Table, version: int, rows: Sequence[Row]) -> None:
        if not rows:
            return
        names = table.column_names
        sql = f"COPY {table.physical_name(version)} ({', '.join(names)}) FROM STDIN"
        with self.conn.cursor() as cursor, cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row([row[n] for n in names])

    def insert_values(self, table: Table, version: int, values: Sequence[Sequence[Value]]) -> None:
        self._copy(table.physical_name(version), table, values)

    def upsert_values(self, table: Table, version: int, values: Sequence[Sequence[Value]]) -> None:
        if not values:
            return
        # COPY into a session-private staging table (emptied at commit), then one upsert.
        name = table.physical_name(version)
        stage = f"{name}_stage"
        if stage not in self._stages:
            self.execute(
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage}"
                f" (LIKE {name} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            self._stages.add(stage)
        self._copy(stage, table, values)
        names = ", ".join(table.column_names)
        self.execute(
            f"INSERT INTO {name} ({names}) SELECT {names} FROM {stage} {_on_conflict(table)}"
        )

    def _copy(self, name: str, table: Table, values: Sequence[Sequence[Value]]) -> None:
        if not values:
            return
        # Binary COPY: the driver encodes each value in C, the server parses no text.
        sql = f"COPY {name} ({', '.join(table.column_names)}) FROM STDIN (FORMAT BINARY)"
        with self.conn.cursor() as cursor, cursor.copy(sql) as copy:
            copy.set_types([_BINARY_TYPES[c.type] for c in table.columns])
            for row in values:
                copy.write_row(row)

    def delete(self, table: Table, version: int, keys: Sequence[Key]) -> None:
        if not keys:
            return
        types = {c.name: c.type for c in table.columns}
        columns = [[key[i] for key in keys] for i in range(len(table.key))]
        casts = ", ".join(f"%s::{types[k]}[]" for k in table.key)
        match = " AND ".join(f"t.{k} = d.{k}" for k in table.key)
        self.execute(
            f"DELETE FROM {table.physical_name(version)} t USING unnest({casts})"
            f" AS d({', '.join(table.key)}) WHERE {match}",
            columns,
        )


def _on_conflict(table: Table) -> str:
    updates = ", ".join(f"{n} = EXCLUDED.{n}" for n in table.column_names if n not in table.key)
    return f"ON CONFLICT ({', '.join(table.key)}) DO " + (
        f"UPDATE SET {updates}" if updates else "NOTHING"
    )


#: Rows a reconcile's pass over differing ranges fetches at a time.
_RANGE_ROWS_PER_FETCH = 2_000

#: Names for those passes' cursors: two may be open at once on one connection.
_CURSORS = itertools.count(1)


def _joined_text(columns: Iterable[str]) -> str:
    """SQL for ``checksums``' text of these columns: values as text, ``\\x1f`` between them,
    ``\\N`` for NULL."""
    null = checksums.NULL.replace("\\", "\\\\")
    separator = f"\\x{ord(checksums.SEPARATOR):02x}"
    values = ", ".join(f"coalesce({name}::text, E'{null}')" for name in columns)
    return f"concat_ws(E'{separator}', {values})"
