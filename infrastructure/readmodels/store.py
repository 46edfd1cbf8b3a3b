"""Read-model databases: the catalog of projection versions, and row I/O in bulk.

One ``ReadStore`` wraps one connection (PostgreSQL through psycopg, or SQLite); each thread
opens its own. The catalog tables are shared by every projection:

- ``daybook_projection_versions``: one row per (projection, version): its state, the log
  position its tables reflect and an ``epoch`` bumped whenever rows are changed by anything
  other than the runner (reconciler repairs), so a runner knows to drop its row cache.
- ``daybook_read_models``: which version of each projection serves reads.
- ``daybook_dead_letters``: events a projection could not apply.
- ``daybook_reconcile_log``: every row the reconciler repaired, before and after.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from daybook.infrastructure.urls import postgres_params, scheme, sqlite_path
from daybook.projections.model import Key, Projection, Row, Table, Value

LIVE = "live"
REBUILDING = "rebuilding"
STOPPED = "stopped"
RETIRED = "retired"

#: Locks catalog DDL so that several processes starting at once do not race.
_DDL_LOCK = 0x64617962  # "dayb"


def now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def version_lock_key(name: str, version: int) -> int:
    """A stable signed 64-bit advisory-lock key for one projection version."""
    digest = hashlib.blake2b(f"daybook:{name}:{version}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True)
class VersionRecord:
    name: str
    version: int
    state: str
    position: int
    epoch: int
    last_event_at: str | None
    updated_at: str
    error: str | None


class ReadStoreError(Exception):
    """A read-model database problem that retrying will not fix."""


_VERSION_COLUMNS = "name, version, state, position, epoch, last_event_at, updated_at, error"


class ReadStore:
    """A connection to a read-model database, with the operations runners and queries use."""

    kind: str
    placeholder = "%s"

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        raise NotImplementedError

    _depth = 0
    _begin_write = "BEGIN"
    _begin_read = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[None]:
        """One transaction (nested calls join the outer one). Read transactions see a single
        snapshot, so a tracking position and the rows read with it always agree."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.execute(self._begin_write if write else self._begin_read)
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            with suppress(Exception):
                self.execute("ROLLBACK")
            raise
        self._depth = 0
        self.execute("COMMIT" if write else "ROLLBACK")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "%s" else sql.replace("%s", self.placeholder)

    # -- schema ------------------------------------------------------------------------------

    def _ddl_guard(self) -> None:
        """Serialise schema changes between processes (PostgreSQL only)."""

    def _serial(self) -> str:
        raise NotImplementedError

    def ensure_catalog(self) -> None:
        with self.transaction():
            self._ddl_guard()
            self.execute(
                "CREATE TABLE IF NOT EXISTS daybook_projection_versions ("
                " name TEXT NOT NULL, version BIGINT NOT NULL, state TEXT NOT NULL,"
                " position BIGINT NOT NULL DEFAULT 0, epoch BIGINT NOT NULL DEFAULT 0,"
                " last_event_at TEXT, updated_at TEXT NOT NULL, error TEXT,"
                " tables TEXT NOT NULL DEFAULT '[]', PRIMARY KEY (name, version))"
            )
            self.execute(
                "CREATE TABLE IF NOT EXISTS daybook_read_models ("
                " name TEXT PRIMARY KEY, active_version BIGINT NOT NULL, switched_at TEXT NOT NULL)"
            )
            self.execute(
                f"CREATE TABLE IF NOT EXISTS daybook_dead_letters ({self._serial()},"
                " name TEXT NOT NULL, version BIGINT NOT NULL, position BIGINT NOT NULL,"
                " event_type TEXT NOT NULL, originator_id TEXT NOT NULL, error TEXT NOT NULL,"
                " attempts BIGINT NOT NULL, created_at TEXT NOT NULL, resolved_at TEXT)"
            )
            self.execute(
                f"CREATE TABLE IF NOT EXISTS daybook_reconcile_log ({self._serial()},"
                " name TEXT NOT NULL, version BIGINT NOT NULL, position BIGINT NOT NULL,"
                " table_name TEXT NOT NULL, row_key TEXT NOT NULL, change TEXT NOT NULL,"
                " before TEXT, after TEXT, repaired_at TEXT NOT NULL)"
            )

    def create_tables(self, projection: Projection) -> None:
        """Create the tables of ``projection`` at its version (call inside a transaction)."""
        self._ddl_guard()
        types = {"text": "TEXT", "bigint": "BIGINT"}
        for table in projection.tables:
            name = table.physical_name(projection.version)
            columns = ", ".join(
                f"{c.name} {types[c.type]}{'' if c.nullable else ' NOT NULL'}"
                for c in table.columns
            )
            key = ", ".join(table.key)
            self.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns}, PRIMARY KEY ({key}))")
            for number, index in enumerate(table.indexes):
                self.execute(
                    f"CREATE INDEX IF NOT EXISTS {name}_i{number} ON {name} ({', '.join(index)})"
                )

    def drop_version_tables(self, name: str, version: int) -> list[str]:
        """Drop the tables a (retired) version created; returns their names."""
        rows = self.execute(
            "SELECT tables FROM daybook_projection_versions WHERE name = %s AND version = %s",
            (name, version),
        )
        names: list[str] = json.loads(rows[0][0]) if rows else []
        for table in names:
            self.execute(f"DROP TABLE IF EXISTS {table}")
        return names

    # -- catalog -----------------------------------------------------------------------------

    def versions(self, name: str | None = None) -> list[VersionRecord]:
        sql = f"SELECT {_VERSION_COLUMNS} FROM daybook_projection_versions"
        params: list[Any] = []
        if name is not None:
            sql += " WHERE name = %s"
            params.append(name)
        rows = self.execute(sql + " ORDER BY name, version", params)
        return [VersionRecord(*row) for row in rows]

    def version(self, name: str, version: int, *, lock: bool = False) -> VersionRecord | None:
        sql = (
            f"SELECT {_VERSION_COLUMNS} FROM daybook_projection_versions"
            " WHERE name = %s AND version = %s"
        )
        rows = self.execute(sql + (self._for_update() if lock else ""), (name, version))
        return VersionRecord(*rows[0]) if rows else None

    def _for_update(self) -> str:
        return ""

    def active_versions(self) -> dict[str, int]:
        return dict(self.execute("SELECT name, active_version FROM daybook_read_models"))

    def active_version(self, name: str) -> int | None:
        rows = self.execute(
            "SELECT active_version FROM daybook_read_models WHERE name = %s", (name,)
        )
        return int(rows[0][0]) if rows else None

    def register(self, projection: Projection) -> VersionRecord | None:
        """Make sure ``projection``'s version exists: the first version of a projection goes
        live at once; a newer one starts rebuilding beside the active one. An older version
        than the active one is not recreated (returns None unless it still exists)."""
        with self.transaction():
            self._ddl_guard()
            existing = self.version(projection.name, projection.version, lock=True)
            if existing is not None:
                return existing
            active = self.active_version(projection.name)
            if active is not None and active > projection.version:
                return None
            self.create_tables(projection)
            state = LIVE if active is None else REBUILDING
            tables = [t.physical_name(projection.version) for t in projection.tables]
            self.execute(
                "INSERT INTO daybook_projection_versions (name, version, state, position,"
                " epoch, updated_at, tables) VALUES (%s, %s, %s, 0, 0, %s, %s)",
                (projection.name, projection.version, state, now_text(), json.dumps(tables)),
            )
            if active is None:
                self.execute(
                    "INSERT INTO daybook_read_models VALUES (%s, %s, %s)",
                    (projection.name, projection.version, now_text()),
                )
            return self.version(projection.name, projection.version)

    def set_position(
        self, name: str, version: int, position: int, last_event_at: str | None
    ) -> None:
        self.execute(
            "UPDATE daybook_projection_versions SET position = %s,"
            " last_event_at = COALESCE(%s, last_event_at), updated_at = %s"
            " WHERE name = %s AND version = %s",
            (position, last_event_at, now_text(), name, version),
        )

    def set_state(self, name: str, version: int, state: str, error: str | None = None) -> None:
        self.execute(
            "UPDATE daybook_projection_versions SET state = %s, error = %s, updated_at = %s"
            " WHERE name = %s AND version = %s",
            (state, error, now_text(), name, version),
        )

    def bump_epoch(self, name: str, version: int) -> None:
        self.execute(
            "UPDATE daybook_projection_versions SET epoch = epoch + 1, updated_at = %s"
            " WHERE name = %s AND version = %s",
            (now_text(), name, version),
        )

    def activate(self, name: str, version: int) -> int | None:
        """Serve reads of ``name`` from ``version``; returns the version it replaces."""
        previous = self.active_version(name)
        self.execute(
            "UPDATE daybook_read_models SET active_version = %s, switched_at = %s WHERE name = %s",
            (version, now_text(), name),
        )
        self.set_state(name, version, LIVE)
        if previous is not None and previous != version:
            self.set_state(name, previous, RETIRED)
        return previous

    def add_dead_letter(
        self,
        name: str,
        version: int,
        position: int,
        event_type: str,
        originator_id: str,
        error: str,
        attempts: int,
    ) -> None:
        self.execute(
            "INSERT INTO daybook_dead_letters (name, version, position, event_type,"
            " originator_id, error, attempts, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (name, version, position, event_type, originator_id, error, attempts, now_text()),
        )

    def dead_letters(self, name: str | None = None) -> list[dict[str, Any]]:
        sql = (
            "SELECT id, name, version, position, event_type, originator_id, error, attempts,"
            " created_at, resolved_at FROM daybook_dead_letters"
        )
        params: list[Any] = []
        if name is not None:
            sql += " WHERE name = %s"
            params.append(name)
        keys = [
            "id",
            "name",
            "version",
            "position",
            "event_type",
            "originator_id",
            "error",
            "attempts",
            "created_at",
            "resolved_at",
        ]
        return [
            dict(zip(keys, row, strict=True)) for row in self.execute(sql + " ORDER BY id", params)
        ]

    def resume(self, name: str, version: int) -> None:
        """Let a stopped projection version try its parked events again."""
        with self.transaction():
            record = self.version(name, version, lock=True)
            if record is None or record.state != STOPPED:
                return
            active = self.active_version(name)
            self.set_state(name, version, LIVE if active == version else REBUILDING)
            self.execute(
                "UPDATE daybook_dead_letters SET resolved_at = %s"
                " WHERE name = %s AND version = %s AND resolved_at IS NULL",
                (now_text(), name, version),
            )

    def record_repair(
        self,
        name: str,
        version: int,
        position: int,
        table: str,
        key: Key,
        change: str,
        before: Row | None,
        after: Row | None,
    ) -> None:
        self.execute(
            "INSERT INTO daybook_reconcile_log (name, version, position, table_name, row_key,"
            " change, before, after, repaired_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                name,
                version,
                position,
                table,
                json.dumps(list(key)),
                change,
                None if before is None else json.dumps(before, sort_keys=True),
                None if after is None else json.dumps(after, sort_keys=True),
                now_text(),
            ),
        )

    # -- rows --------------------------------------------------------------------------------

    def count(self, table: Table, version: int) -> int:
        return int(self.execute(f"SELECT count(*) FROM {table.physical_name(version)}")[0][0])

    def all_rows(self, table: Table, version: int) -> Iterator[Row]:
        names = table.column_names
        sql = f"SELECT {', '.join(names)} FROM {table.physical_name(version)}"
        for values in self.execute(sql):
            yield dict(zip(names, values, strict=True))

    def fetch(self, table: Table, version: int, key: Key) -> Row | None:
        names = table.column_names
        where = " AND ".join(f"{k} = %s" for k in table.key)
        rows = self.execute(
            f"SELECT {', '.join(names)} FROM {table.physical_name(version)} WHERE {where}", key
        )
        return dict(zip(names, rows[0], strict=True)) if rows else None

    def select(
        self,
        table: Table,
        version: int,
        where: str = "",
        params: Sequence[Any] = (),
        order: str = "",
        limit: int | None = None,
    ) -> list[Row]:
        names = table.column_names
        sql = f"SELECT {', '.join(names)} FROM {table.physical_name(version)}"
        if where:
            sql += f" WHERE {where}"
        if order:
            sql += f" ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [dict(zip(names, values, strict=True)) for values in self.execute(sql, params)]

    def upsert(self, table: Table, version: int, rows: Sequence[Row]) -> None:
        raise NotImplementedError

    def insert(self, table: Table, version: int, rows: Sequence[Row]) -> None:
        """Append rows that must not exist yet (a duplicate is a bug, and fails)."""
        raise NotImplementedError

    def delete(self, table: Table, version: int, keys: Sequence[Key]) -> None:
        if not keys:
            return
        where = " AND ".join(f"{k} = %s" for k in table.key)
        self.executemany(f"DELETE FROM {table.physical_name(version)} WHERE {where}", keys)

    def insert_values(self, table: Table, version: int, values: Sequence[Sequence[Value]]) -> None:
        """Append rows given as value tuples in column order (keys must not exist yet)."""
        self.insert(table, version, [dict(zip(table.column_names, v, strict=True)) for v in values])

    def upsert_values(self, table: Table, version: int, values: Sequence[Sequence[Value]]) -> None:
        """Insert or replace rows given as value tuples in column order."""
        self.upsert(table, version, [dict(zip(table.column_names, v, strict=True)) for v in values])

    def head_position(self) -> int | None:
        """The newest log position, if the event store lives in this database."""
        return None


class PostgresStore(ReadStore):
    kind = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        # Autocommit: transactions are always explicit (see ``ReadStore.transaction``).
        self.conn = psycopg.connect(
            postgres_params(url).conninfo(), connect_timeout=10, autocommit=True
        )
        self._depth = 0
        self._stages: set[str] = set()

    def close(self) -> None:
        with suppress(Exception):
            self.conn.close()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cursor:
            cursor.execute(sql, params or None)  # type: ignore[arg-type]  # built SQL text
            return cursor.fetchall() if cursor.description else []

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(sql, rows)  # type: ignore[arg-type]  # built SQL text

    def _serial(self) -> str:
        return "id BIGSERIAL PRIMARY KEY"

    def _ddl_guard(self) -> None:
        self.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))

    def _for_update(self) -> str:
        return " FOR UPDATE"

    def upsert(self, table: Table, version: int, rows: Sequence[Row]) -> None:
        if not rows:
            return
        # One statement for the whole batch: each column travels as one array.
        names = table.column_names
        casts = ", ".join(f"%s::{c.type}[]" for c in table.columns)
        updates = ", ".join(f"{n} = EXCLUDED.{n}" for n in names if n not in table.key)
        columns = [[row[n] for row in rows] for n in names]
        self.execute(
            f"INSERT INTO {table.physical_name(version)} ({', '.join(names)})"
            f" SELECT * FROM unnest({casts})"
            f" ON CONFLICT ({', '.join(table.key)}) DO "
            + (f"UPDATE SET {updates}" if updates else "NOTHING"),
            columns,
        )

    def insert(self, table: Table, version: int, rows: Sequence[Row]) -> None:
        if not rows:
            return
        names = table.column_names
        with (
            self.conn.cursor() as cursor,
            cursor.copy(
                f"COPY {table.physical_name(version)} ({', '.join(names)}) FROM STDIN"  # type: ignore[arg-type]
            ) as copy,
        ):
            for row in rows:
                copy.write_row([row[n] for n in names])

    def insert_values(self, table: Table, version: int, values: Sequence[Sequence[Value]]) -> None:
        self._copy(table.physical_name(version), table, values)

    def _copy(self, name: str, table: Table, values: Sequence[Sequence[Value]]) -> None:
        if not values:
            return
        # Binary COPY: the driver encodes each value in C, the server parses no text.
        sql = f"COPY {name} ({', '.join(table.column_names)}) FROM STDIN (FORMAT BINARY)"
        with self.conn.cursor() as cursor, cursor.copy(sql) as copy:
            copy.set_types([_BINARY_TYPES[c.type] for c in table.columns])
            for row in values:
                copy.write_row(row)

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
        names = table.column_names
        updates = ", ".join(f"{n} = EXCLUDED.{n}" for n in names if n not in table.key)
        self.execute(
            f"INSERT INTO {name} ({', '.join(names)}) SELECT {', '.join(names)} FROM {stage}"
            f" ON CONFLICT ({', '.join(table.key)}) DO "
            + (f"UPDATE SET {updates}" if updates else "NOTHING")
        )

    def delete(self, table: Table, version: int, keys: Sequence[Key]) -> None:
        if not keys:
            return
        key_types = [table_column_type(table, k) for k in table.key]
        columns = [[key[i] for key in keys] for i in range(len(table.key))]
        casts = ", ".join(f"%s::{t}[]" for t in key_types)
        match = " AND ".join(f"t.{k} = d.{k}" for k in table.key)
        self.execute(
            f"DELETE FROM {table.physical_name(version)} t USING unnest({casts})"
            f" AS d({', '.join(table.key)}) WHERE {match}",
            columns,
        )

    def head_position(self) -> int | None:
        rows = self.execute("SELECT to_regclass('daybook_events') IS NOT NULL")
        if not rows[0][0]:
            return None
        return int(
            self.execute("SELECT COALESCE(max(notification_id), 0) FROM daybook_events")[0][0]
        )

    def try_lock(self, key: int) -> bool:
        """Take a session advisory lock on this connection, if free (outside transactions)."""
        return bool(self.execute("SELECT pg_try_advisory_lock(%s)", (key,))[0][0])


#: Binary COPY type names of the column types.
_BINARY_TYPES = {"text": "text", "bigint": "int8"}


def table_column_type(table: Table, name: str) -> str:
    for column in table.columns:
        if column.name == name:
            return column.type
    raise KeyError(name)


class SqliteStore(ReadStore):
    kind = "sqlite"
    placeholder = "?"

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")

    # IMMEDIATE takes the write lock up front: the tracking row cannot change under us.
    _begin_write = "BEGIN IMMEDIATE"
    _begin_read = "BEGIN"

    def close(self) -> None:
        with suppress(Exception):
            self.conn.close()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(self._sql(sql), tuple(params)).fetchall()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(self._sql(sql), rows)

    def _serial(self) -> str:
        return "id INTEGER PRIMARY KEY AUTOINCREMENT"

    def upsert(self, table: Table, version: int, rows: Sequence[Row]) -> None:
        self._write("INSERT OR REPLACE", table, version, _in_column_order(table, rows))

    def insert(self, table: Table, version: int, rows: Sequence[Row]) -> None:
        self._write("INSERT", table, version, _in_column_order(table, rows))

    def insert_values(self, table: Table, version: int, values: Sequence[Sequence[Value]]) -> None:
        self._write("INSERT", table, version, values)

    def upsert_values(self, table: Table, version: int, values: Sequence[Sequence[Value]]) -> None:
        self._write("INSERT OR REPLACE", table, version, values)

    def _write(
        self, verb: str, table: Table, version: int, values: Sequence[Sequence[Value]]
    ) -> None:
        names = table.column_names
        self.conn.executemany(
            f"{verb} INTO {table.physical_name(version)} ({', '.join(names)})"
            f" VALUES ({', '.join('?' for _ in names)})",
            values,
        )

    def head_position(self) -> int | None:
        rows = self.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'stored_events'"
        )
        if not rows[0][0]:
            return None
        return int(self.execute("SELECT COALESCE(max(rowid), 0) FROM stored_events")[0][0])


def readmodel_url(events_url: str) -> str:
    """Where read models live by default: beside the events (a temporary SQLite file for an
    in-memory event store, which no other process can see anyway)."""
    if scheme(events_url) == "memory":
        directory = tempfile.mkdtemp(prefix="daybook-readmodels-")
        return f"sqlite:///{directory}/readmodels.db"
    return events_url


def open_store(url: str) -> ReadStore:
    """A connection to the read-model database at ``url`` (postgresql:// or sqlite:///)."""
    kind = scheme(url)
    if kind == "postgresql":
        return PostgresStore(url)
    if kind == "sqlite":
        return SqliteStore(sqlite_path(url))
    msg = f"read models need a database: use sqlite:///path.db or postgresql://..., not {url!r}"
    raise ReadStoreError(msg)


def key_text(key: Key) -> str:
    return json.dumps(list(key))


def values_equal(a: Value, b: Value) -> bool:
    return a == b


def _in_column_order(table: Table, rows: Sequence[Row]) -> list[tuple[Value, ...]]:
    names = table.column_names
    return [tuple(row[n] for n in names) for row in rows]
