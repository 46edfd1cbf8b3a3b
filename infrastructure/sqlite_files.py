"""What every daybook connection to an SQLite file needs, event store and read models alike."""

from __future__ import annotations

import sqlite3
import time

#: How long a connection waits for a lock another holds (SQLite's busy timeout), seconds.
BUSY_TIMEOUT = 30.0


def use_wal(conn: sqlite3.Connection, timeout: float = BUSY_TIMEOUT) -> None:
    """Put ``conn``'s file in WAL mode (it stays so: later connections find it there).

    While one connection switches a new file to WAL, SQLite answers another doing the same
    "database is locked" at once rather than after the busy timeout, and a new file is
    opened by several connections together: a process's services as it starts, a ledger
    and its read models, two processes started at once. The switch is tried again
    meanwhile, for as long as the busy timeout (``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
