"""One connection to a read-model database: its transactions, and the row operations and
locks every dialect provides (``postgres.PostgresStore``, ``sqlite.SqliteStore``).

Callers write SQL with ``%s`` placeholders and standard clauses; everything a dialect does
its own way (bulk writes, checksums computed in the database, locks, the log's head, a
missing table's error) is a method here, so no caller needs to know which database it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any

from daybook.infrastructure.readmodels import checksums
from daybook.projections.model import ColumnType, Key, Projection, Row, Table, Value

#: Serialises schema changes between processes (see ``ReadStore.ddl_guard``).
DDL_LOCK = 0x64617962  # "dayb"

#: The shard of a summed table's rows written by the log's runner and by repairs (stream
#: workers write one shard per partition, numbered from 0).
LOG_SHARD = -1
REPAIR_SHARD = -2


def read_row(table: Table, values: Sequence[Any]) -> Row:
    """The row of ``table`` that a database row's values (in column order) stand for:
    ``numeric`` columns may come back from the database as decimals (PostgreSQL) or as
    their text (SQLite, past 64 bits: see ``SqliteStore``), and are ints again here."""
    row = dict(zip(table.column_names, values, strict=True))
    for index in table.numeric:
        if values[index] is not None:
            row[table.column_names[index]] = int(values[index])
    return row


class ReadStoreError(Exception):
    """A read-model database problem that retrying will not fix."""


def now_text() -> str:
    """The current time as the catalog stores it (see ``time_text``)."""
    return time_text(datetime.now(UTC))


def time_text(moment: datetime) -> str:
    """``moment`` (UTC) as the catalog stores times: ISO 8601 with microseconds, so that
    stored times compare as text in time order."""
    return moment.isoformat(timespec="microseconds")


class WriterLocks(ABC):
    """Locks that say which process writes a projection version, held by a session of their
    own until released or closed (so that they outlive transactions, and die with the
    process)."""

    #: Whether another process sees these locks (False: every lock is granted).
    between_processes: bool

    @abstractmethod
    def try_take(self, key: int, *, shared: bool = False) -> bool:
        """Take the lock ``key`` if it is free (shared: free of exclusive holders)."""

    @abstractmethod
    def release(self, key: int) -> None: ...

    @abstractmethod
    def check(self) -> None:
        """Raise if the session holding the locks is gone (and the locks with it)."""

    def held_elsewhere(self, key: int) -> bool:
        """Whether another session holds the lock ``key`` (a writer follows that version);
        False where locks are not seen between processes."""
        return False

    @abstractmethod
    def close(self) -> None: ...


class ReadStore(ABC):
    """A connection to a read-model database (one thread at a time)."""

    #: How write and read transactions begin (see ``transaction``).
    #: Writes read their own snapshot per statement: a statement run after a lock was
    #: granted (``ddl_guard``, a writer's lock) sees what committed while it waited,
    #: whatever the database's default isolation.
    begin_write = "BEGIN ISOLATION LEVEL READ COMMITTED"
    begin_read = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

    #: How each column type is declared (see ``ColumnType``).
    column_types = {"text": "TEXT", "bigint": "BIGINT", "numeric": "NUMERIC"}

    _depth = 0

    # -- connection and transactions -------------------------------------------------------

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    @abstractmethod
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

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
        self.control(self.begin_write if write else self.begin_read)
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            with suppress(Exception):
                self.control("ROLLBACK")
            raise
        self._depth = 0
        self.control("COMMIT" if write else "ROLLBACK")

    def control(self, sql: str) -> None:
        """Run a transaction's BEGIN, COMMIT or ROLLBACK."""
        self.execute(sql)

    # -- what each dialect does its own way ------------------------------------------------

    @abstractmethod
    def lock_transaction(self, key: int) -> None:
        """Wait for the lock ``key`` and hold it until this transaction ends: write
        transactions taking the same key run one after another."""

    @abstractmethod
    def wait_for_locks_at_most(self, seconds: float | None) -> None:
        """In this transaction, give up (with an error) on a lock not granted within
        ``seconds`` rather than queue for it (and make every later reader queue behind);
        None: wait as the connection's settings say again."""

    def ddl_guard(self) -> None:
        """Serialise schema changes between processes starting at once (in a transaction)."""
        self.lock_transaction(DDL_LOCK)

    @abstractmethod
    def open_locks(self) -> WriterLocks:
        """A session for ``WriterLocks`` on the same database (the caller closes it)."""

    @abstractmethod
    def serial_key(self) -> str:
        """Column definition of an ``id`` primary key numbered by the database."""

    @abstractmethod
    def locking(self, select: str) -> str:
        """``select`` made to lock the rows it reads until the transaction ends."""

    def sharing(self, select: str) -> str:
        """``select`` made to lock the rows it reads against writers (not against other
        sharers) until the transaction ends."""
        return self.locking(select)

    @abstractmethod
    def head_position(self) -> int | None:
        """The newest log position, if the event store lives in this database."""

    @abstractmethod
    def has_column(self, table: str, name: str) -> bool:
        """Whether ``table`` has a column ``name`` (say, before an upgrade added it)."""

    @abstractmethod
    def add_column(self, table: str, definition: str) -> None:
        """Add a column (``name TYPE ...``) to a table unless it has one of that name."""

    @abstractmethod
    def refused_rows(self, error: BaseException) -> bool:
        """Whether ``error`` says the database refused rows written (a key twice, a value out
        of range): the fault of whoever wrote them, not of the connection or the server."""

    def lock_not_granted(self, error: BaseException) -> bool:
        """Whether ``error`` is ``wait_for_locks_at_most`` giving up."""
        return False

    @abstractmethod
    def is_missing_table(self, error: BaseException) -> bool:
        """Whether ``error`` says a table does not exist (dropped under a reader, say)."""

    @abstractmethod
    def is_missing_column(self, error: BaseException) -> bool:
        """Whether ``error`` says a column does not exist (a table of another version)."""

    # -- tables ----------------------------------------------------------------------------

    def create_tables(self, projection: Projection, *, temporary: bool = False) -> None:
        """Create the tables of ``projection`` at its version (call inside a transaction);
        ``temporary``: this session's own, hiding any of the same name, gone when it ends."""
        if not temporary:
            self.ddl_guard()
        kind = "TEMPORARY TABLE" if temporary else "TABLE"
        for table in (t.stored for t in projection.tables):
            name = table.physical_name(projection.version)
            columns = ", ".join(
                f"{c.name} {self.column_types[c.type]}{'' if c.nullable else ' NOT NULL'}"
                for c in table.columns
            )
            key = f", PRIMARY KEY ({', '.join(table.key)})"
            if table.append_only:
                # Rows only ever appended (COPY), never looked up by key while the version is
                # built: the key's unique index is built once, sorted, by ``create_keys``
                # when the version starts serving. Kept up row by row instead, in the random
                # order of the keys, it cost the server more than the rest of the rebuild.
                key = ""
            self.execute(f"CREATE {kind} IF NOT EXISTS {name} ({columns}{key})")
            for number, index in enumerate(() if temporary else table.indexes):
                self.execute(
                    f"CREATE INDEX IF NOT EXISTS {name}_i{number} ON {name} ({', '.join(index)})"
                )

    def create_keys(self, projection: Projection, only: Table | None = None) -> None:
        """Give the append-only tables of ``projection``'s version (or just ``only``) their
        key (a unique index; ``create_tables`` leaves it out): before the version serves
        reads, and before anything but an append writes to them. Fails if two rows have the
        same key. Call inside a transaction."""
        for table in projection.tables if only is None else (only,):
            if table.append_only:
                name = table.physical_name(projection.version)
                # Asked first: tables made before keys were deferred have a primary key
                # (a second unique index would cost every append), and even an index that
                # exists takes a lock that waits for the table's writers.
                if not self.has_unique_key(name):
                    self.create_unique_index(name, f"{name}_key", table.key)

    def create_unique_index(self, table: str, index: str, columns: Sequence[str]) -> None:
        """Build ``index`` on ``table`` unless it exists (``create_keys``)."""
        self.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {table} ({', '.join(columns)})")

    @abstractmethod
    def has_unique_key(self, name: str) -> bool:
        """Whether table ``name`` has its primary key or the key ``create_keys`` builds."""

    def drop_table(self, name: str) -> None:
        self.execute(f"DROP TABLE IF EXISTS {name}")

    # -- reading rows ----------------------------------------------------------------------
    #
    # Reads see a table's rows as its definition has them: a summed table's shards are added
    # up here (``source``). Writers of shards use ``Table.stored``.

    def source(self, table: Table, version: int) -> str:
        """What to select a table's rows from."""
        name = table.physical_name(version)
        if not table.summed:
            return name
        keys = ", ".join(table.key)
        sums = ", ".join(
            f"{self.total(c.name, c.type)} AS {c.name}"
            for c in table.columns
            if c.name not in table.key
        )
        return f"(SELECT {keys}, {sums} FROM {name} GROUP BY {keys}) AS {name}_total"

    def total(self, column: str, kind: ColumnType) -> str:
        """SQL adding up a summed table's shards of ``column`` (a ``kind`` column)."""
        # sum() of bigints is a numeric in PostgreSQL: cast back, so readers get ints.
        return f"sum({column})" if kind == "numeric" else f"CAST(sum({column}) AS BIGINT)"

    def count(self, table: Table, version: int) -> int:
        return int(self.execute(f"SELECT count(*) FROM {self.source(table, version)}")[0][0])

    def all_rows(self, table: Table, version: int) -> Iterator[Row]:
        sql = f"SELECT {', '.join(table.column_names)} FROM {self.source(table, version)}"
        for values in self.execute(sql):
            yield read_row(table, values)

    def fetch(self, table: Table, version: int, key: Key) -> Row | None:
        where = " AND ".join(f"{k} = %s" for k in table.key)
        rows = self.execute(
            f"SELECT {', '.join(table.column_names)} FROM {self.source(table, version)}"
            f" WHERE {where}",
            key,
        )
        return read_row(table, rows[0]) if rows else None

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
        sql = f"SELECT {', '.join(names)} FROM {self.source(table, version)}"
        if where:
            sql += f" WHERE {where}"
        if order:
            sql += f" ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [read_row(table, values) for values in self.execute(sql, params)]

    def count_by(self, table: Table, version: int, column: str) -> dict[Any, int]:
        """How many rows the table holds for each value of ``column``."""
        if column not in table.column_names:
            msg = f"{table.name} has no column {column!r}"
            raise ValueError(msg)
        source = self.source(table, version)
        sql = f"SELECT {column}, count(*) FROM {source} GROUP BY {column}"
        counted = self.execute(sql)
        if table.column_names.index(column) in table.numeric:
            counted = [(None if v is None else int(v), count) for v, count in counted]
        return {value: int(count) for value, count in counted}

    def range_checksums(self, table: Table, version: int) -> dict[str, tuple[int, int]]:
        """Row count and checksum of each key range of the stored table (see
        ``checksums``); computed here from every row unless the dialect can do better."""
        return checksums.by_range(table, self.all_rows(table, version))

    def rows_in_ranges(self, table: Table, version: int, ranges: set[str]) -> dict[Key, Row]:
        """The stored rows whose keys fall in ``ranges``, by key."""
        rows = ((table.key_of(row), row) for row in self.all_rows(table, version))
        return {key: row for key, row in rows if checksums.range_of(key) in ranges}

    def rows_by_range(
        self, table: Table, version: int, ranges: set[str]
    ) -> Iterator[tuple[str, dict[Key, Row]]]:
        """Each of ``ranges`` in order, with its stored rows by key (none: empty), one range's
        rows in memory at a time. Here a pass over the table per range; PostgreSQL reads
        them all in one pass."""
        for each in sorted(ranges):
            yield each, self.rows_in_ranges(table, version, {each})

    # -- writing rows (inside the caller's transaction) ------------------------------------

    @abstractmethod
    def upsert(self, table: Table, version: int, rows: Sequence[Row]) -> None:
        """Insert rows, or replace the rows with the same keys."""

    @abstractmethod
    def insert(self, table: Table, version: int, rows: Sequence[Row]) -> None:
        """Append rows that must not exist yet (a duplicate is a bug, and fails)."""

    def replace_total(self, table: Table, version: int, key: Key, row: Row | None) -> None:
        """Make a summed table's row at ``key`` read as ``row`` (None: absent): its shards go,
        one row takes their place (a repair)."""
        where = " AND ".join(f"{k} = %s" for k in table.key)
        self.execute(f"DELETE FROM {table.physical_name(version)} WHERE {where}", key)
        if row is not None:
            self.insert(table.stored, version, [{**row, "shard": REPAIR_SHARD}])

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
