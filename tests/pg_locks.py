"""Watching PostgreSQL from a test: sessions waiting for a lock, deadlocks detected, and
sessions listening for new events; and where the ledger keeps its events.

Each watches from a connection of its own: inside a transaction (a blocker's, say),
pg_stat_activity keeps showing what it showed first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, LiteralString

import psycopg
import pytest

_WAITING = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND wait_event_type = 'Lock'"
)


def _count(watcher: psycopg.Connection[tuple[int]], query: LiteralString) -> int:
    row = watcher.execute(query).fetchone()
    return int(row[0]) if row else 0


def _waiting(watcher: psycopg.Connection[tuple[int]]) -> int:
    return _count(watcher, _WAITING)


def _until(
    watcher: psycopg.Connection[tuple[int]],
    query: LiteralString,
    ready: Callable[[int], bool],
    failure: str,
    interval: float = 0.05,
) -> None:
    """Poll the count ``query`` answers until ``ready`` accepts it; fail after 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ready(_count(watcher, query)):
            return
        time.sleep(interval)
    pytest.fail(failure)


def wait_for_lock_waits(url: str, count: int, who: str) -> None:
    """Until ``count`` sessions of the database at ``url`` wait for a lock."""
    with psycopg.connect(url, autocommit=True) as watcher:
        _until(watcher, _WAITING, lambda n: n >= count, f"{who} never waited for a lock")


def waits_or_finishes(url: str, thread: threading.Thread, count: int) -> bool:
    """Until ``thread`` has finished (True) or ``count`` sessions of the database at ``url``
    wait for a lock (False): for a step that waits on the code under test's old behaviour
    and not on its new one."""
    with psycopg.connect(url, autocommit=True) as watcher:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not thread.is_alive():
                return True
            if _waiting(watcher) >= count:
                return False
            time.sleep(0.01)
    pytest.fail("the step neither finished nor waited for a lock")


def deadlocks_once_all_sessions_ended(url: str) -> int:
    """The database's count of deadlocks PostgreSQL detected. A session adds its counts to
    the shared statistics by the time it has ended, so this waits for every other session
    of the database to end first."""
    with psycopg.connect(url, autocommit=True) as watcher:
        _until(
            watcher,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()",
            lambda n: n == 0,
            "sessions of the test's database never ended",
        )
        row = watcher.execute(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        assert row is not None
        return int(row[0])


def wait_for_advisory_locks_released(url: str) -> None:
    """Until no session of the database at ``url`` holds an exclusive advisory lock. A
    session's locks go when the server has ended it, a moment after its client closed the
    connection (about one close in fifty on an idle machine still holds them just after)."""
    with psycopg.connect(url, autocommit=True) as watcher:
        _until(
            watcher,
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE d.datname = current_database() AND l.locktype = 'advisory'"
            " AND l.mode = 'ExclusiveLock' AND l.granted",
            lambda n: n == 0,
            "advisory locks still held 30 s after their sessions were closed",
            interval=0.01,
        )


def listening_sessions(url: str) -> int:
    """Sessions of ``url``'s database that listen for new events (a session nobody reads
    holds back the server's notification queue)."""
    with psycopg.connect(url, autocommit=True) as watcher:
        return _count(
            watcher,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE 'LISTEN %'",
        )


def events_table(conn: Any) -> str:
    """The ledger's events table in the database of ``conn``, schema-qualified and quoted."""
    row = conn.execute(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables"
        " WHERE tablename LIKE '%events' AND tablename NOT LIKE '%snapshot%'"
    ).fetchone()
    assert row is not None, "no events table: open a ledger on the database first"
    table: str = row[0]
    return table
