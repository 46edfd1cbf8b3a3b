"""Read models in SQLite: one file, one writer at a time (``BEGIN IMMEDIATE``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from daybook.infrastructure.readmodels.store import ReadStore, WriterLocks, read_row
from daybook.infrastructure.sqlite_files import BUSY_TIMEOUT, use_wal
from daybook.projections.model import ColumnType, Row, Table, Value


class NoLocks(WriterLocks):
    """SQLite has no locks that outlive a transaction, so every lock is granted: two runners
    may both follow a version, and the tracking row (checked and moved in every batch's
    transaction) still lets only one of them apply each batch."""

    between_processes = False

    def try_take(self, key: int, *, shared: bool = False) -> bool:
        return True

    def release(self, key: int) -> None:
        pass

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass


def _fits(value: int) -> bool:
    """Whether SQLite can hold ``value`` as an integer (64 bits, signed)."""
    return -(2**63) <= value < 2**63


class _ExactSum:
    """``daybook_sum``: the exact sum of a ``numeric`` column, stored as ``_fitted`` stores
    values (SQLite's own sum() turns a text past 64 bits into a float)."""

    def __init__(self) -> None:
        self.total: int | None = None

    def step(self, value: str | int | None) -> None:
        if value is not None:
            self.total = (self.total or 0) + int(value)

    def finalize(self) -> str | int | None:
        total = self.total
        return str(total) if total is not None and not _fits(total) else total


class SqliteStore(ReadStore):
    # IMMEDIATE takes the write lock up front: the tracking row cannot change under us.
    begin_write = "BEGIN IMMEDIATE"
    begin_read = "BEGIN"
    # SQLite's integers stop at 64 bits, and a column with NUMERIC affinity would turn a
    # larger one into a float. A ``numeric`` column has none (BLOB): it keeps an integer
    # that fits 64 bits as one (compared, sorted and summed as such), and one past them as
    # its decimal text (``_write``), which ``read_row`` turns back into an int. (SQLite
    # orders any text after every integer: right for totals past 2**63-1, not for those
    # below -2**63.)
    column_types = {**ReadStore.column_types, "numeric": "BLOB"}

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        try:
            use_wal(self.conn)
        except BaseException:
            self.conn.close()
            raise
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.create_aggregate("daybook_sum", 1, _ExactSum)  # type: ignore[arg-type]

    def close(self) -> None:
        with suppress(Exception):
            self.conn.close()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(self._sql(sql), tuple(params)).fetchall()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(self._sql(sql), rows)

    def all_rows(self, table: Table, version: int) -> Iterator[Row]:
        # Row by row from the cursor: a table may not fit in memory (the reconciler's fold).
        names = table.column_names
        cursor = self.conn.execute(f"SELECT {', '.join(names)} FROM {self.source(table, version)}")
        for values in cursor:
            yield read_row(table, values)

    def _sql(self, sql: str) -> str:
        return sql.replace("%s", "?")  # callers write psycopg's placeholders

    # -- dialect -----------------------------------------------------------------------------

    def total(self, column: str, kind: ColumnType) -> str:
        return f"daybook_sum({column})" if kind == "numeric" else super().total(column, kind)

    def lock_transaction(self, key: int) -> None:
        """Nothing to take: a write transaction (``BEGIN IMMEDIATE``) already holds the
        database's only write lock until it ends."""

    def has_unique_key(self, name: str) -> bool:
        rows = self.execute(
            "SELECT 1 FROM pragma_index_list(%s) WHERE origin = 'pk' OR name = %s",
            (name, f"{name}_key"),
        )
        return bool(rows)

    def wait_for_locks_at_most(self, seconds: float | None) -> None:
        """Nothing to bound: a write transaction already holds the database's only write
        lock, and readers (WAL) never block it."""

    def open_locks(self) -> NoLocks:
        return NoLocks()

    def serial_key(self) -> str:
        return "id INTEGER PRIMARY KEY AUTOINCREMENT"

    def locking(self, select: str) -> str:
        return select  # the write transaction holds the whole database already

    def head_position(self) -> int | None:
        rows = self.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'stored_events'"
        )
        if not rows[0][0]:
            return None
        return int(self.execute("SELECT COALESCE(max(rowid), 0) FROM stored_events")[0][0])

    def add_column(self, table: str, definition: str) -> None:
        if not self.has_column(table, definition.split()[0]):
            self.execute(f"ALTER TABLE {table} ADD COLUMN {definition}")

    def has_column(self, table: str, name: str) -> bool:
        return any(row[1] == name for row in self.execute(f"PRAGMA table_info({table})"))

    def refused_rows(self, error: BaseException) -> bool:
        # An integer past 64 bits never reaches the database: the driver refuses to bind it
        # (OverflowError, not a database error), where PostgreSQL says "out of range". The
        # rows' fault either way: only their projection stops, not the whole runner.
        return isinstance(error, sqlite3.IntegrityError | OverflowError)

    def is_missing_table(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.OperationalError) and "no such table" in str(error)

    def is_missing_column(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.OperationalError) and "no such column" in str(error)

    # -- writing rows --------------------------------------------------------------------------

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
        if table.numeric:
            values = [_fitted(row, table.numeric) for row in values]
        self.conn.executemany(
            f"{verb} INTO {table.physical_name(version)} ({', '.join(names)})"
            f" VALUES ({', '.join('?' for _ in names)})",
            values,
        )


def _fitted(values: Sequence[Value], numeric: tuple[int, ...]) -> list[Value]:
    """``values`` with those at ``numeric`` that do not fit 64 bits as their text."""
    row = list(values)
    for index in numeric:
        value = row[index]
        if isinstance(value, int) and not _fits(value):
            row[index] = str(value)
    return row


def _in_column_order(table: Table, rows: Sequence[Row]) -> list[tuple[Value, ...]]:
    names = table.column_names
    return [tuple(row[n] for n in names) for row in rows]
