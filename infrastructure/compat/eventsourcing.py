"""eventsourcing's internals that daybook relies on (written against 9.5).

daybook's recorders extend eventsourcing's: each writes a batch's idempotency records in the
transaction that inserts its events, by overriding the protected ``_insert_events`` hook the
public ``insert_events`` calls, and the PostgreSQL one adds its own DDL to the list of
statements ``create_table`` runs, and runs them itself. The aggregate cache replaces the
repository's. The domain's aggregate base (``daybook.domain.events.LedgerAggregate``)
subclasses ``BaseAggregate``: it creates aggregates with ``_create`` and copies the list behind
``pending_events`` by name; the domain cannot import this module, so those names are listed
here and checked, like the others, by tests/unit/test_compat.py. The domain's snapshots
(``daybook.domain.snapshots.LedgerSnapshot``) rebuild an aggregate by setting the attributes
``BaseAggregate`` keeps its id, version and timestamps in.
"""

from __future__ import annotations

import functools
import sqlite3
import time
import weakref
from collections.abc import Sequence
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.persistence import InterfaceError, OperationalError
from eventsourcing.postgres import PostgresAggregateRecorder, PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteConnection, SQLiteConnectionPool
from psycopg_pool.base import AttemptWithBackoff

from daybook.domain.events import LedgerAggregate
from daybook.domain.snapshots import LedgerSnapshot
from daybook.infrastructure.compat import Internal, Kind
from daybook.infrastructure.sqlite_files import BUSY_TIMEOUT, use_wal
from daybook.infrastructure.transient import AT_ONCE, discard_ended_connections


def listen_conninfo(datastore: Any) -> tuple[str, dict[str, Any]]:
    """The connection string and the connection settings of a PostgreSQL datastore's pool,
    for a connection of one's own (the event log's LISTEN connection): psycopg_pool keeps
    them as the ``conninfo`` and ``kwargs`` it was built with."""
    pool = datastore.pool
    kwargs = getattr(pool, "kwargs", None) or {}
    # Everything but the row factory eventsourcing adds (a psycopg option, not libpq's): the
    # event store factory's libpq settings (TCP liveness, the URL's) included.
    return str(pool.conninfo), {k: v for k, v in kwargs.items() if k != "row_factory"}


def set_on_each_session(datastore: Any, statements: Sequence[str]) -> None:
    """Run ``statements`` on each new connection of a PostgreSQL datastore's pool, after
    eventsourcing's own set-up: psycopg_pool calls the ``configure`` function it was built
    with (eventsourcing's, kept as ``_configure``) on each connection it makes. Settings made
    so rather than as libpq ``options`` at connect: a pooler in between (PgBouncer) refuses
    a startup parameter it does not track, and every connection with it."""
    pool = datastore.pool
    configure = pool._configure

    def configured(conn: Any) -> None:
        if configure is not None:
            configure(conn)
        for statement in statements:
            conn.execute(statement)

    pool._configure = configured


#: The longest psycopg_pool waits between two attempts to replace a lost connection, once a
#: ledger's pool is set so (``reconnect_promptly``).
RECONNECT_DELAY = 1.0


class _PromptBackoff(AttemptWithBackoff):
    """psycopg_pool's backoff between attempts to connect, its delay capped."""

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_DELAY)


def reconnect_promptly(datastore: Any) -> None:
    """Have a PostgreSQL datastore's pool try to replace a lost connection at least every
    ``RECONNECT_DELAY`` seconds (plus the attempt's own ``connect_timeout``).

    psycopg_pool doubles the delay between attempts (1, 2, 4, 8, 16 s...), so once an outage
    has lasted a while the next attempt may be many seconds away when the server is back:
    every command meanwhile waits the pool's timeout and is answered ``unavailable`` by a
    ledger whose database is up. Its ``_add_connection`` makes that backoff when it is given
    none (a first attempt, and a pool that grows); here it is given this capped one."""
    pool = datastore.pool
    add_connection = type(pool)._add_connection
    # The pool keeps this function: a weak reference, not a cycle through the pool.
    owner = weakref.ref(pool)

    def add(attempt: AttemptWithBackoff | None = None, growing: bool = False) -> None:
        live = owner()
        if live is None:
            return
        if attempt is None:
            attempt = _PromptBackoff(timeout=live.reconnect_timeout)
        add_connection(live, attempt, growing=growing)

    pool._add_connection = add


#: Attempts of a read whose connection failed at once (``AT_ONCE``: a pooled connection
#: that died in a restart, which a fresh one cures).
_READ_ATTEMPTS = 10


def retried_only_at_once(method: Any) -> Any:
    """eventsourcing's read ``method`` (a PostgreSQL recorder's) with its retry kept for
    failures that come at once, and dropped for one that waited (the pool's
    ``connect_timeout``, for a server that refuses connections). eventsourcing retries its
    reads ten times (``@retry(..., max_attempts=10)``), each waiting the pool's whole
    timeout: a command on an account not cached was held ten times ``connect_timeout``
    (100 s by default), twice over, far past ``LedgerService.outage_budget``. Its ``retry``
    keeps the undecorated method as ``__wrapped__`` (functools.wraps), called here."""
    inner = method.__wrapped__

    @functools.wraps(inner)
    def read(self: Any, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, _READ_ATTEMPTS + 1):
            started = time.monotonic()
            try:
                return inner(self, *args, **kwargs)
            except (InterfaceError, OperationalError) as error:
                if attempt == _READ_ATTEMPTS or time.monotonic() - started >= AT_ONCE:
                    raise
                # The server ended the session (a restart, its idle_session_timeout): the
                # pool's other idle connections are as dead; replaced, not tried in turn.
                discard_ended_connections(self, error)
                time.sleep(0.2)
        raise AssertionError("unreachable")

    return read


#: The reads ``retried_only_at_once`` is applied to (daybook's PostgreSQL recorders).
RETRIED_READS = (
    (PostgresApplicationRecorder, "select_events"),
    (PostgresApplicationRecorder, "select_notifications"),
    (PostgresApplicationRecorder, "max_notification_id"),
    (PostgresAggregateRecorder, "select_events"),
)


class _QueryOnlyPool(SQLiteConnectionPool):
    """Connections that cannot change the file: it is never created (``mode=rw``), SQLite
    refuses every write (``query_only``), and the journal mode is left as it is:
    eventsourcing's pool switches a file to WAL in ``_create_connection`` unless its
    ``is_journal_mode_wal`` says the file is in WAL already."""

    def __init__(self, *, db_name: str, lock_timeout: int | None) -> None:
        uri = f"{Path(db_name).resolve().as_uri()}?mode=rw"
        super().__init__(db_name=uri, lock_timeout=lock_timeout)
        self.is_journal_mode_wal = True  # what the pool checks before switching

    def _create_connection(self) -> SQLiteConnection:
        connection = super()._create_connection()
        connection.cursor().execute("PRAGMA query_only = ON")
        return connection


def query_only_pool(db_name: str, lock_timeout: int | None) -> SQLiteConnectionPool:
    """A pool of connections to the SQLite file ``db_name`` that change nothing in it (for
    ``daybook requests purge --dry-run``)."""
    return _QueryOnlyPool(db_name=db_name, lock_timeout=lock_timeout)


def switch_pool_to_wal(pool: SQLiteConnectionPool) -> None:
    """Put the file of a pool's database in WAL mode before the pool connects, and tell the
    pool so (``is_journal_mode_wal``). eventsourcing's pool switches the file itself in
    ``_create_connection``, once, and on a new file opened by other connections at the same
    moment (a ledger's read models, another process) SQLite can refuse that switch at once
    with "database is locked", which opening the ledger then fails with. ``use_wal``
    switches it, trying again for the busy timeout. (An in-memory database has no file.)"""
    if pool.is_sqlite_memory_mode or pool.is_journal_mode_wal:
        return
    timeout = pool.lock_timeout or BUSY_TIMEOUT
    with closing(sqlite3.connect(pool.db_name, uri=True, timeout=timeout)) as conn:
        use_wal(conn, timeout)
    pool.is_journal_mode_wal = True


def _recorders() -> None:
    """Stands for the recorders in ``daybook.infrastructure.eventstore`` (memory, sqlite,
    postgres), which override and extend the names below."""


#: Every eventsourcing name daybook uses beyond its documented interface, and its shape.
RELIED_ON: tuple[Internal, ...] = (
    Internal(
        "eventsourcing",
        "eventsourcing.sqlite:SQLiteConnectionPool",
        "is_journal_mode_wal",
        query_only_pool,
        "SQLiteConnectionPool.__init__ (set True, the pool leaves the journal mode alone: "
        "set so by query_only_pool, and by switch_pool_to_wal once the file is in WAL)",
        on_instance=True,
        types=(bool,),
        used_in="eventsourcing.sqlite:SQLiteConnectionPool._create_connection",
    ),
    Internal(
        "eventsourcing",
        "eventsourcing.sqlite:SQLiteConnectionPool",
        "is_sqlite_memory_mode",
        switch_pool_to_wal,
        "SQLiteConnectionPool.__init__ (whether the database is in memory, with no file)",
        on_instance=True,
        types=(bool,),
        used_in="eventsourcing.sqlite:SQLiteConnectionPool._create_connection",
    ),
    Internal(
        "eventsourcing",
        "eventsourcing.sqlite:SQLiteConnectionPool",
        "_create_connection",
        query_only_pool,
        "the SQLite pool's connect (every new connection is made by it)",
        kind=Kind.FUNCTION,
        used_in="eventsourcing.persistence:ConnectionPool._get_connection",
    ),
    Internal(
        "eventsourcing",
        "eventsourcing.popo:POPOApplicationRecorder",
        "_insert_events",
        _recorders,
        "the in-memory recorder's insert_events (it must still call _insert_events)",
        kind=Kind.FUNCTION,
        parameters=("stored_events",),
        used_in="eventsourcing.popo:POPOApplicationRecorder.insert_events",
    ),
    Internal(
        "eventsourcing",
        "eventsourcing.popo:POPOApplicationRecorder",
        "_database_lock",
        _recorders,
        "POPOAggregateRecorder.__init__ (the lock every in-memory read and write takes)",
        on_instance=True,
        members=("__enter__", "__exit__"),
    ),
    Internal(
        "eventsourcing",
        "eventsourcing.popo:POPOApplicationRecorder",
        "_stored_events_index",
        _recorders,
        "POPOAggregateRecorder.__init__ (per aggregate id text, version -> place in the list "
        "of stored events, whose position is one more; read by the memory recorder's "
        "positions and snapshots)",
        on_instance=True,
        types=(dict,),
    ),
    Internal(
        "eventsourcing",
        "eventsourcing.sqlite:SQLiteApplicationRecorder",
        "_insert_events",
        _recorders,
        "the SQLite recorder's insert_events (it must call _insert_events in its transaction)",
        kind=Kind.FUNCTION,
        parameters=("c", "stored_events"),
        used_in="eventsourcing.sqlite:SQLiteAggregateRecorder.insert_events",
    ),
    Internal(
        "eventsourcing",
        "eventsourcing.sqlite:SQLiteApplicationRecorder",
        "construct_create_table_statements",
        _recorders,
        "the SQLite recorder's table creation",
        kind=Kind.FUNCTION,
    ),
    # daybook's PostgreSQL recorder creates its tables as the base class does, from the same
    # list of statements, but one transaction per statement.
    Internal(
        "eventsourcing",
        "eventsourcing.postgres:PostgresRecorder",
        "sql_create_statements",
        _recorders,
        "PostgresRecorder.create_table (the list must still hold all of a recorder's DDL)",
        on_instance=True,
        types=(list,),
        used_in="eventsourcing.postgres:PostgresRecorder.create_table",
    ),
    Internal(
        "eventsourcing",
        "eventsourcing.postgres:PostgresDatastore",
        "register_type_adapters",
        _recorders,
        "PostgresRecorder.create_table (what it does after the statements, daybook's too)",
        kind=Kind.FUNCTION,
        used_in="eventsourcing.postgres:PostgresRecorder.create_table",
    ),
    Internal(
        "eventsourcing",
        "eventsourcing.postgres:PostgresDatastore",
        "lock_timeout",
        _recorders,
        "PostgresDatastore.__init__ (POSTGRES_LOCK_TIMEOUT, used by the append function)",
        on_instance=True,
        types=(int,),
    ),
    Internal(
        "eventsourcing",
        "eventsourcing.postgres:PostgresDatastore",
        "pool",
        listen_conninfo,
        "PostgresDatastore.__init__ (its psycopg_pool pool: conninfo and kwargs, and its "
        "reconnect_timeout, which the event store factory shortens)",
        on_instance=True,
        members=("conninfo", "kwargs", "reconnect_timeout"),
    ),
    Internal(
        "psycopg-pool",
        "psycopg_pool:ConnectionPool",
        "_configure",
        set_on_each_session,
        "ConnectionPool.__init__ and _connect (the configure function, kept and called on "
        "each new connection; tests/integration/test_cli_errors.py: a stricter default "
        "isolation is still written READ COMMITTED)",
        on_instance=True,
        used_in="psycopg_pool.pool:ConnectionPool._connect",
    ),
    Internal(
        "psycopg-pool",
        "psycopg_pool:ConnectionPool",
        "_add_connection",
        reconnect_promptly,
        "ConnectionPool._add_connection (still makes its own backoff only when given none, "
        "and still called so by AddConnection; tests/integration/test_partition.py: a "
        "healed link commits within a few seconds)",
        kind=Kind.FUNCTION,
        parameters=("attempt", "growing"),
        used_in="psycopg_pool.pool:AddConnection._run",
    ),
    Internal(
        "psycopg-pool",
        "psycopg_pool:ConnectionPool",
        "drain",
        discard_ended_connections,
        "ConnectionPool.drain (public since 3.2; still closes the idle connections without "
        "testing them and has the workers open new ones; "
        "tests/integration/test_pg_restarts.py)",
        kind=Kind.FUNCTION,
    ),
    Internal(
        "psycopg-pool",
        "psycopg_pool.base:AttemptWithBackoff",
        "update_delay",
        reconnect_promptly,
        "AttemptWithBackoff.update_delay (still sets the delay ConnectionPool._add_connection "
        "waits before its next attempt)",
        kind=Kind.FUNCTION,
        parameters=("now",),
        used_in="psycopg_pool.pool:ConnectionPool._add_connection",
    ),
    Internal(
        "psycopg-pool",
        "psycopg_pool.base:AttemptWithBackoff",
        "delay",
        reconnect_promptly,
        "AttemptWithBackoff.__init__ (the seconds AddConnection is scheduled after)",
        on_instance=True,
        types=(float,),
        used_in="psycopg_pool.pool:ConnectionPool._add_connection",
    ),
    *(
        Internal(
            "eventsourcing",
            f"eventsourcing.postgres:{owner.__name__}.{name}",
            "__wrapped__",
            retried_only_at_once,
            f"{owner.__name__}.{name} (still decorated with eventsourcing's retry, which "
            "keeps the undecorated read as __wrapped__; tests/unit/test_read_retries.py)",
            kind=Kind.FUNCTION,
        )
        for owner, name in RETRIED_READS
    ),
    Internal(
        "eventsourcing",
        "eventsourcing.application:LRUCache",
        "maxsize",
        _recorders,
        "LRUCache.__init__ (daybook's AggregateCache takes the repository's cache size)",
        on_instance=True,
        types=(int,),
    ),
    Internal(
        "eventsourcing",
        "eventsourcing.domain:BaseAggregate",
        "_create",
        LedgerAggregate.trigger_event,
        "BaseAggregate._create (how the domain creates an aggregate from its first event)",
        kind=Kind.FUNCTION,
        parameters=("event_class",),
    ),
    *(
        Internal(
            "eventsourcing",
            "daybook.domain.accounts:Account",
            name,
            LedgerSnapshot.mutate,
            "BaseAggregate.__base_init__ (where an aggregate keeps its id, version and times)",
            on_instance=True,
            types=types,
            used_in="eventsourcing.domain:BaseAggregate.__base_init__",
        )
        for name, types in (
            ("_id", (UUID,)),
            ("_version", (int,)),
            ("_created_on", (datetime,)),
            ("_modified_on", (datetime,)),
        )
    ),
    Internal(
        "eventsourcing",
        "daybook.domain.accounts:Account",
        "_pending_events",
        LedgerAggregate.clone,
        "BaseAggregate.__base_init__ and pending_events (the list clone copies by name)",
        on_instance=True,
        types=(list,),
        used_in="eventsourcing.domain:BaseAggregate.__base_init__",
    ),
)
