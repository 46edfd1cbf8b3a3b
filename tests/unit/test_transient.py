"""``is_transient``: which failures a retry can cure, judged on real exceptions."""

from __future__ import annotations

import itertools
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

import psycopg
import psycopg_pool
import pytest
from aiokafka import errors as kafka_errors
from eventsourcing import persistence
from eventsourcing.sqlite import SQLiteDatastore

from daybook.infrastructure.transient import (
    cancelled,
    causes,
    is_transient,
    may_only_read,
    storage_full,
)

_roles = itertools.count()


def _wrapped(wrapper: type[persistence.PersistenceError], cause: BaseException) -> BaseException:
    """``cause`` as eventsourcing re-raises it: ``raise Wrapper(str(e)) from e``."""
    with pytest.raises(wrapper) as caught:
        try:
            raise cause
        except BaseException as error:
            raise wrapper(str(error)) from error
    return caught.value


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nobody listens there any more


@pytest.fixture
def refused() -> psycopg.OperationalError:
    """What psycopg raises when nothing listens on the server's port."""
    conninfo = f"host=127.0.0.1 port={_closed_port()} dbname=daybook connect_timeout=5"
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(conninfo)
    return caught.value


@pytest.fixture
def locked(tmp_path: Path) -> sqlite3.OperationalError:
    """What SQLite raises when another connection holds the write lock."""
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    waiter = sqlite3.connect(path, isolation_level=None, timeout=0)
    with pytest.raises(sqlite3.OperationalError, match="locked") as caught:
        waiter.execute("BEGIN IMMEDIATE")
    waiter.close()
    holder.close()
    return caught.value


def test_a_refused_connection_is_transient(refused: psycopg.OperationalError) -> None:
    assert refused.sqlstate is None
    assert is_transient(refused)


def test_a_refused_connection_wrapped_by_eventsourcing_is_transient(
    refused: psycopg.OperationalError,
) -> None:
    assert is_transient(_wrapped(persistence.OperationalError, refused))
    assert is_transient(_wrapped(persistence.InterfaceError, refused))


def test_a_locked_sqlite_database_is_transient(locked: sqlite3.OperationalError) -> None:
    assert is_transient(locked)
    assert is_transient(_wrapped(persistence.OperationalError, locked))


def test_a_missing_table_is_not_transient_even_wrapped(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db")
    with pytest.raises(sqlite3.OperationalError, match="no such table") as missing:
        conn.execute("SELECT * FROM nope")
    conn.close()
    assert not is_transient(missing.value)
    # Wrapped by eventsourcing's own SQLite datastore, as the event store raises it.
    datastore = SQLiteDatastore(str(tmp_path / "events.db"))

    with (
        pytest.raises(persistence.OperationalError) as wrapped,
        datastore.transaction(commit=False) as cursor,
    ):
        cursor.execute("SELECT * FROM nope")
    datastore.close()
    assert isinstance(wrapped.value.__cause__, sqlite3.OperationalError)
    assert not is_transient(wrapped.value)


def test_a_full_sqlite_database_is_storage_full_not_transient(tmp_path: Path) -> None:
    """SQLite's "database or disk is full", a real one (the file may not grow past its
    pages), as it comes and as eventsourcing wraps it: out of storage, which no retry cures
    until an operator frees space; no lock, no integrity error, is."""
    conn = sqlite3.connect(tmp_path / "x.db")
    conn.execute("CREATE TABLE t (v BLOB)")
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(sqlite3.OperationalError, match="full") as full:
        conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
    conn.close()
    for error in (full.value, _wrapped(persistence.OperationalError, full.value)):
        assert storage_full(error) and not is_transient(error)


def test_a_full_postgresql_disk_is_storage_full_and_nothing_else_is() -> None:
    assert storage_full(psycopg.errors.DiskFull("could not extend file"))
    assert storage_full(
        _wrapped(persistence.OperationalError, psycopg.errors.DiskFull("could not extend file"))
    )
    assert storage_full(
        psycopg.errors.IoError('could not write to file "x": No space left on device')
    )
    assert not storage_full(psycopg.errors.IoError("could not read block 7: read only 0 bytes"))
    assert not storage_full(psycopg.errors.OutOfMemory("out of memory"))
    assert not storage_full(psycopg.OperationalError("connection failed: Connection refused"))


def test_an_sqlite_integrity_error_is_not_transient(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db")
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.IntegrityError) as duplicate:
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    assert not is_transient(duplicate.value)
    assert not is_transient(_wrapped(persistence.IntegrityError, duplicate.value))


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.SerializationFailure("could not serialize access"),
        psycopg.errors.DeadlockDetected("deadlock detected"),
        psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"),
        psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
        psycopg.errors.CrashShutdown("terminating connection because of crash"),
        psycopg.errors.CannotConnectNow("the database system is starting up"),
        psycopg.errors.TooManyConnections("sorry, too many clients already"),
        psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
        psycopg.errors.QueryCanceled("canceling statement due to user request"),
        psycopg.errors.ConnectionFailure("connection failure"),
        psycopg.OperationalError("the connection is closed"),
        psycopg.OperationalError("consuming input failed: server closed the connection"),
        psycopg_pool.PoolTimeout("couldn't get a connection after 30.00 sec"),
        persistence.ConnectionUnavailableError("timed out waiting for a connection"),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),
        OSError(113, "No route to host"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_transient(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.UniqueViolation("duplicate key value violates unique constraint"),
        psycopg.errors.ForeignKeyViolation("violates foreign key constraint"),
        psycopg.errors.UndefinedTable('relation "rm_account_balances_v1" does not exist'),
        psycopg.errors.SyntaxError("syntax error at or near"),
        psycopg.errors.InsufficientPrivilege("permission denied"),
        psycopg.errors.DiskFull("could not extend file"),
        psycopg.errors.NumericValueOutOfRange("bigint out of range"),
        psycopg.InterfaceError("the cursor is closed"),
        psycopg.errors.PipelineAborted("pipeline aborted"),
        psycopg_pool.PoolClosed("the pool is closed"),
        psycopg.ProgrammingError("query has no parameters"),
        persistence.OperationalError("Can't do multi-row tracking with single-row tracking"),
        persistence.ProgrammingError("table not found"),
        ValueError("bad value"),
        KeyError("account_id"),
        RuntimeError("boom"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_not_transient(error: BaseException) -> None:
    assert not is_transient(error)


def test_broker_errors_are_transient_unless_the_request_itself_is_wrong() -> None:
    errors = kafka_errors
    assert is_transient(errors.KafkaConnectionError("broker down"))
    assert is_transient(errors.NodeNotReadyError("node not ready"))
    assert is_transient(errors.RequestTimedOutError())
    assert is_transient(errors.UnknownError())
    assert not is_transient(errors.TopicAuthorizationFailedError())
    assert not is_transient(errors.InvalidTopicError())


def _refusal(conninfo: str) -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(conninfo, connect_timeout=5)
    return caught.value


@pytest.mark.postgres
def test_a_server_refusing_the_database_or_the_role_is_not_transient(pg_url: str) -> None:
    """The server answered, and no retry will change its answer: a database or a role that
    does not exist. (A service then stops with the reason instead of retrying forever.)"""
    conninfo = psycopg.conninfo.conninfo_to_dict(pg_url)
    missing_database = _refusal(psycopg.conninfo.make_conninfo(**{**conninfo, "dbname": "nope"}))
    missing_role = _refusal(psycopg.conninfo.make_conninfo(**{**conninfo, "user": "nobody"}))
    for error in (missing_database, missing_role):
        assert error.sqlstate is None  # libpq gives none for a failed connection
        assert not is_transient(error), error
        assert not is_transient(_wrapped(persistence.OperationalError, error))


@pytest.mark.postgres
def test_a_wrong_password_is_not_transient(pg_url: str) -> None:
    """A role whose connections must give a password (a line of its own at the top of the
    server's pg_hba.conf, then a reload), and a connection that gives the wrong one."""
    role = f"daybook_pw_{next(_roles)}_{os.getpid()}"
    admin = psycopg.connect(pg_url, autocommit=True)
    row = admin.execute("SHOW hba_file").fetchone()
    assert row is not None
    hba = Path(row[0])
    before = hba.read_text()
    admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'right'")
    try:
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n{before}")
        admin.execute("SELECT pg_reload_conf()")
        conninfo = psycopg.conninfo.conninfo_to_dict(pg_url)
        wrong = _refusal(
            psycopg.conninfo.make_conninfo(**{**conninfo, "user": role, "password": "wrong"})
        )
        assert "password authentication failed" in str(wrong)
        assert not is_transient(wrong)
    finally:
        hba.write_text(before)
        admin.execute("SELECT pg_reload_conf()")
        admin.execute(f"DROP ROLE {role}")
        admin.close()


@pytest.mark.postgres
def test_a_statement_the_server_cancels_is_transient(pg_url: str) -> None:
    """The server's ``statement_timeout``, or an operator's ``pg_cancel_backend``: the
    statement did not fail on its data, and may finish when tried again (a service stuck
    on one that never does says ``retrying``, with this reason)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("SET statement_timeout = 50")
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout") as timed:
            conn.execute("SELECT pg_sleep(5)")
        conn.execute("SET statement_timeout = 0")
        pid = conn.info.backend_pid
        with psycopg.connect(pg_url, autocommit=True) as operator:

            def cancel_once_sleeping() -> None:
                sleeping = "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'"
                while operator.execute(sleeping, (pid,)).fetchone() is None:
                    time.sleep(0.01)
                operator.execute("SELECT pg_cancel_backend(%s)", (pid,))

            canceller = threading.Thread(target=cancel_once_sleeping, daemon=True)
            canceller.start()
            with pytest.raises(psycopg.errors.QueryCanceled, match="user request") as by_operator:
                conn.execute("SELECT pg_sleep(5)")
            canceller.join()
    for error in (timed.value, by_operator.value):
        assert error.sqlstate == "57014"
        assert is_transient(error), error
        assert is_transient(_wrapped(persistence.OperationalError, error))
        assert cancelled(error) and cancelled(_wrapped(persistence.OperationalError, error))
    assert not cancelled(psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"))


@pytest.mark.postgres
def test_a_session_the_server_ended_for_idling_in_a_transaction_is_transient(
    pg_url: str,
) -> None:
    """The server's ``idle_in_transaction_session_timeout`` (eventsourcing sets one on the
    event store's sessions; a DBA may set one on any database) ends a session left idle in
    a transaction, by a process paused or starved for a while: nothing was wrong with what
    it did, and a new connection carries on, as after any lost connection."""
    with psycopg.connect(pg_url) as conn:
        conn.execute("SET idle_in_transaction_session_timeout = 50")
        conn.execute("SELECT 1")  # in a transaction now, then idle in it
        time.sleep(0.5)
        with pytest.raises(psycopg.Error) as ended:
            conn.execute("SELECT 1")
    assert is_transient(ended.value), (type(ended.value), ended.value.sqlstate, ended.value)
    assert is_transient(_wrapped(persistence.OperationalError, ended.value))


def test_a_broker_error_raised_through_fausts_producer_is_judged_by_its_cause() -> None:
    """faust's producer re-raises a broker error as ``ProducerSendError``, ``from`` it: a
    worker publishing dead letters took a lost broker for a failure no retry cures, and
    stopped (FAILED) at every start while the broker was away."""
    from faust.exceptions import ProducerSendError

    def through_faust(cause: BaseException) -> BaseException:
        try:
            raise ProducerSendError(f"Error while sending: {cause!r}") from cause
        except ProducerSendError as error:
            return error

    assert is_transient(through_faust(kafka_errors.KafkaConnectionError("broker down")))
    assert is_transient(through_faust(kafka_errors.KafkaTimeoutError()))
    assert not is_transient(through_faust(kafka_errors.MessageSizeTooLargeError()))
    assert not is_transient(ProducerSendError("No transaction producer found for : x"))


def test_a_broker_that_does_not_take_a_record_in_time_is_an_outage() -> None:
    """aiokafka's ``KafkaTimeoutError`` (its buffer stayed full, the broker away) is not
    marked retriable, yet a later try, once the broker is back, goes through."""
    assert is_transient(kafka_errors.KafkaTimeoutError())


@pytest.mark.parametrize(
    ("error", "rolled"),
    [
        (psycopg.errors.DeadlockDetected("deadlock detected"), True),
        (psycopg.errors.SerializationFailure("could not serialize access"), True),
        # Class 40 too, but the outcome is unknown: not "nothing committed".
        (psycopg.errors.StatementCompletionUnknown("statement completion unknown"), False),
        (psycopg.errors.QueryCanceled("canceling statement"), False),
        (psycopg.OperationalError("connection refused"), False),
    ],
    ids=["deadlock", "serialization", "completion-unknown", "cancelled", "refused"],
)
def test_rolled_back_is_a_deadlock_or_a_serialization_failure_only(
    error: Exception, rolled: bool
) -> None:
    from daybook.infrastructure.transient import rolled_back

    assert rolled_back(error) is rolled


def test_a_failure_whose_chain_loops_is_judged_and_ends() -> None:
    """An error raised again while handling one it caused (a retry that re-raises an earlier
    attempt's error) makes its chain of causes loop. Walking it never ended: a projection
    runner judging such a failure (a statement its timeout cut off) hung, neither retrying
    nor stopping."""
    first = psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
    second = persistence.OperationalError("retried")
    second.__context__ = first
    first.__context__ = second  # the loop
    judged: list[object] = []
    thread = threading.Thread(
        target=lambda: judged.append((may_only_read(second), storage_full(second))),
        daemon=True,
    )
    thread.start()
    thread.join(10)
    assert judged == [(False, False)]
    assert list(causes(second)) == [second, first]
