"""Whether a failure is worth retrying: one answer for every service that retries.

Transient: the connection was lost, refused (but not a server refusing the credentials, the
role or the database: see ``_REFUSALS``) or ended by the server's idle timeouts, the server is
shutting down or starting up,
a transaction lost a serialization conflict or a deadlock, a lock wait timed out, a
statement was cancelled (the server's ``statement_timeout``, or ``pg_cancel_backend``),
SQLite's database is locked by another writer, or the network failed (``OSError``). eventsourcing
wraps driver errors in its own classes (after its own retries), so those are judged by the
error they wrap. Everything else (integrity and programming errors, missing tables, bad
data) would fail the same way again: retrying only hides it.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import sys
from collections.abc import Iterator

import psycopg
import psycopg_pool
from eventsourcing.persistence import ConnectionUnavailableError, PersistenceError

#: PostgreSQL SQLSTATEs a retry can cure (besides class 08, connection exceptions).
_RETRYABLE_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available: lock_timeout, NOWAIT
        "57P01",  # admin_shutdown: the server is shutting down
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now: starting up or in recovery
        "57P05",  # idle_session_timeout: the server closed the session
        # idle_in_transaction_session_timeout: the server ended a session left idle in a
        # transaction (a process paused or starved meanwhile), which rolled back; a new
        # connection carries on.
        "25P03",
        "53300",  # too_many_connections
        # query_canceled: the server's statement_timeout fired, or an operator cancelled
        # the backend (pg_cancel_backend). The statement did not fail on its data, and the
        # same statement may finish next time (a lock released, a load passed). Judged the
        # event's, a handler's row read cut off so had its event parked and the read model
        # part from the log, silently; a statement that always exceeds the timeout shows
        # instead as a service stuck ``retrying`` with this reason, which is visible.
        "57014",
    }
)

#: SQLite's primary result codes for "another connection holds the lock".
_SQLITE_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what caused it, and so on (eventsourcing and the stores wrap the
    driver's error, explicitly or while handling it)."""
    # A chain may loop (an error raised again while handling one it caused: a retry that
    # re-raises an earlier attempt's error): each is given once, or a check walking the
    # chain would never end, and the service judging its failure would hang.
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def may_only_read(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says the PostgreSQL connection may only read: a
    hot standby or ``default_transaction_read_only``, a role without the right to create or
    change tables."""
    return any(
        isinstance(
            cause, psycopg.errors.ReadOnlySqlTransaction | psycopg.errors.InsufficientPrivilege
        )
        for cause in causes(error)
    )


def denied(error: BaseException) -> bool:
    """Whether ``error``, or what raised it (``raise ... from``, as eventsourcing wraps the
    driver's errors), is the database refusing a statement for the role's privileges or a
    read-only session. Not what it was raised while handling (``may_only_read`` counts
    that too): a bug met while handling such a refusal is a bug."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(
            cause, psycopg.errors.ReadOnlySqlTransaction | psycopg.errors.InsufficientPrivilege
        ):
            return True
        cause = cause.__cause__
    return False


#: Seconds within which a failed attempt on a database counts as failing "at once" (a pooled
#: connection that died in a restart, which a fresh one cures) rather than after waiting for
#: a server that does not answer (the pool's ``connect_timeout``).
AT_ONCE = 1.0


#: A deadlock and a serialization failure: the transaction was rolled back. (Not all of
#: class 40: ``40003 statement_completion_unknown`` leaves the outcome unknown.)
_ROLLED_BACK = frozenset({"40001", "40P01"})


def rolled_back(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is PostgreSQL rolling a transaction back over
    contention (a deadlock, a serialization failure): the server answered, nothing was
    committed, and the same work may go through next time."""
    # By SQLSTATE: psycopg's DeadlockDetected is no subclass of its TransactionRollback.
    return any(
        isinstance(cause, psycopg.Error) and cause.sqlstate in _ROLLED_BACK
        for cause in causes(error)
    )


#: SQLSTATEs of a session the server itself ended: it is up and answering, and every other
#: connection a pool kept idle meanwhile has most likely been ended too (a restart ends them
#: all; ``idle_session_timeout`` ends every one left idle as long).
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P05", "25P03"})


def session_ended(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is the server ending the session (a restart,
    ``pg_terminate_backend``, its idle timeouts), or closing it without a word."""
    for cause in causes(error):
        if isinstance(cause, psycopg.Error) and (
            cause.sqlstate in _SESSION_ENDED
            or "server closed the connection unexpectedly" in str(cause)
        ):
            return True
    return False


def discard_ended_connections(recorder: object, error: BaseException) -> None:
    """After ``error`` ended a session of ``recorder``'s PostgreSQL pool: replace every
    connection the pool keeps idle (psycopg_pool's ``drain``: closed, and new ones opened by
    the pool's workers), so that the retry gets a fresh connection rather than the next
    dead one, each of which would cost an attempt. Not tested one by one (``check``): the
    server that ended one session may be silent to the others (a partition just after),
    and a test of each would hold the caller a TCP timeout per connection. Closing does not
    wait for the server, and a retry waits for a new connection only as long as the pool's
    own timeout, within the ledger's outage budget."""
    pool = getattr(getattr(recorder, "datastore", None), "pool", None)
    drain = getattr(pool, "drain", None)
    if drain is None or not session_ended(error):
        return
    with contextlib.suppress(Exception):
        drain()


def cancelled(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a statement the PostgreSQL server cancelled
    (its ``statement_timeout``, or ``pg_cancel_backend``): transient, but the attempt has
    already waited the whole timeout, and its connection is fine."""
    return any(isinstance(cause, psycopg.errors.QueryCanceled) for cause in causes(error))


def storage_full(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a database out of disk space: PostgreSQL's
    ``disk_full`` (53100; an I/O error, 58030, that says "No space left on device"), SQLite's
    ``SQLITE_FULL``. Nothing was written, and a retry fails the same way until an operator
    frees space: not transient, and no bug in daybook either."""
    for cause in causes(error):
        if isinstance(cause, psycopg.Error) and (
            cause.sqlstate == "53100"
            or (cause.sqlstate == "58030" and "No space left on device" in str(cause))
        ):
            return True
        if isinstance(cause, sqlite3.Error):
            code = getattr(cause, "sqlite_errorcode", None)
            if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
                return True
    return False


def is_transient(error: BaseException) -> bool:
    """True if the same call may succeed when tried again (after reconnecting)."""
    if isinstance(error, PersistenceError):
        # eventsourcing raises these ``from`` the driver's error when it has one.
        cause = error.__cause__
        if cause is not None:
            return is_transient(cause)
        # Its own pool timing out waiting for a connection has no cause.
        return isinstance(error, ConnectionUnavailableError)
    if isinstance(error, psycopg.Error):
        return _postgres_transient(error)
    # An error of aiokafka's comes only from a process that imported it: read its classes
    # from there rather than import it here, which would cost every process that never
    # talks to a broker (the write path, an embedding service, most of the CLI) a fifth of
    # a second at start.
    kafka = sys.modules.get("aiokafka.errors")
    if kafka is not None and isinstance(error, kafka.KafkaError):
        # aiokafka marks each broker error class retriable or not (a lost connection, a
        # timeout, a leader election: yes; a refused authorization, a bad request: no). The
        # broker's own "unknown server error" is a fault on its side, not in the request:
        # retried too (a broker that lost its data answers it while recreating topics). A
        # record the producer could not hand over in time (``KafkaTimeoutError``, its buffer
        # full with the broker away) is not marked retriable, yet goes once the broker is.
        return bool(error.retriable) or isinstance(
            error, kafka.UnknownError | kafka.KafkaTimeoutError
        )
    if (
        kafka is not None
        and isinstance(error.__cause__, kafka.KafkaError)
        and type(error).__module__.startswith("faust.")
    ):
        # faust's producer re-raises a broker error as its own ``ProducerSendError``, from
        # it (known by module: faust is not imported on the write path).
        return is_transient(error.__cause__)
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        # Extended codes (SQLITE_BUSY_SNAPSHOT, ...) keep the primary code in the low byte.
        return code is not None and code & 0xFF in _SQLITE_BUSY_CODES
    return isinstance(error, OSError)


def _postgres_transient(error: psycopg.Error) -> bool:
    state = error.sqlstate
    if state is not None:
        return state.startswith("08") or state in _RETRYABLE_SQLSTATES
    # No SQLSTATE: the driver or the pool failed, not a statement. An OperationalError then
    # means the connection could not be made or was lost: retried, unless the server
    # answered and refused who or what was asked for.
    if isinstance(error, psycopg.errors.PipelineAborted | psycopg_pool.PoolClosed):
        return False  # an earlier error aborted the pipeline; a closed pool stays closed
    return isinstance(error, psycopg.OperationalError) and not _refused(str(error))


#: The server's answers to a connection attempt that no retry changes (a wrong password, no
#: pg_hba.conf line for this client, a role or database that does not exist). libpq gives no
#: SQLSTATE for a failed connection attempt, only the server's message: these are
#: PostgreSQL's own texts in English. A server set to answer in another language is not
#: recognised, and its refusals are retried like a refused port, as before. Other refusals
#: (ident, peer, certificates, a ``reject`` line) are retried too: safe, if slow to notice.
_REFUSALS = re.compile(
    r"FATAL:\s+(password authentication failed|no pg_hba\.conf entry"
    r'|role ".*" does not exist|database ".*" does not exist'
    r'|role ".*" is not permitted to log in|permission denied for database)'
)


def _refused(message: str) -> bool:
    """Whether the server refused the connection for good (its startup ``FATAL`` says so)."""
    return _REFUSALS.search(message) is not None


def login_refused(error: BaseException) -> bool:
    """Whether ``error``, or one it was raised from, is a server refusing a connection for
    good (``_REFUSALS``: a wrong password, a role or database that does not exist): no
    outage, no bug either, but the operator's to mend."""
    seen: BaseException | None = error
    while seen is not None:
        refusal = isinstance(seen, psycopg.OperationalError) and seen.sqlstate is None
        if refusal and _refused(str(seen)):
            return True
        seen = seen.__cause__
    return False


def first_line(error: BaseException) -> str:
    """``error`` in one line (its type, and its message's first line), for a recorded
    reason or a health's error."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
