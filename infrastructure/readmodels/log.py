"""Reading the event log as ``LogEvent``s, and waiting for it to grow."""

from __future__ import annotations

import threading
from contextlib import suppress
from typing import Any

import psycopg
from eventsourcing.postgres import PostgresDatastore

from domain.ledger import Ledger
from infrastructure.codec import ContractMapper
from projections.model import LogEvent

#: eventsourcing's PostgreSQL recorder NOTIFYs this channel in every insert transaction.
EVENTS_CHANNEL = "daybook_events"


class LogReader:
    """The log of one ``Ledger``: events after a position, the head, and new-event wake-ups.

    On PostgreSQL a LISTEN connection wakes the reader as soon as events commit; waits are
    still bounded by the poll interval, so a lost notification or a dropped listen connection
    only costs one interval, never a stall.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.recorder: Any = ledger.recorder
        mapper = ledger.mapper
        if not isinstance(mapper, ContractMapper):
            msg = (
                "the ledger must use infrastructure.codec.ContractMapper (open it with open_ledger)"
            )
            raise TypeError(msg)
        self.mapper = mapper
        self._listen: psycopg.Connection[Any] | None = None
        self._interrupt = threading.Event()

    def read(self, after: int, limit: int) -> list[LogEvent]:
        """Up to ``limit`` events with positions greater than ``after``, in log order."""
        notifications = self.recorder.select_notifications(
            after + 1, limit, inclusive_of_start=True
        )
        decode = self.mapper.decode_state
        return [LogEvent.from_state(n.id, n.topic, decode(n)) for n in notifications]

    def head(self) -> int:
        return int(self.recorder.max_notification_id() or 0)

    def interrupt(self) -> None:
        """Wake a ``wait`` early (used to stop runners promptly)."""
        self._interrupt.set()
        listen = self._listen
        if listen is not None and not listen.closed:
            # A waiting LISTEN connection only wakes for a notification: send one.
            with (
                suppress(psycopg.Error),
                psycopg.connect(
                    listen.info.dsn, password=listen.info.password, autocommit=True
                ) as conn,
            ):
                conn.execute(f"NOTIFY {EVENTS_CHANNEL}")

    def wait(self, timeout: float) -> None:
        """Return when new events may have arrived, or after ``timeout`` seconds."""
        datastore = getattr(self.recorder, "datastore", None)
        if not isinstance(datastore, PostgresDatastore):
            self._interrupt.wait(timeout)
            self._interrupt.clear()
            return
        try:
            connection = self._listen_connection(datastore)
            for _ in connection.notifies(timeout=timeout, stop_after=1):
                break
            # Drain anything else already queued so the next wait blocks again.
            for _ in connection.notifies(timeout=0):
                pass
        except psycopg.Error:
            self._close_listen()
            self._interrupt.wait(min(timeout, 0.5))
            self._interrupt.clear()

    def _listen_connection(self, datastore: Any) -> psycopg.Connection[Any]:
        if self._listen is None or self._listen.closed:
            kwargs = datastore.pool.kwargs if hasattr(datastore.pool, "kwargs") else {}
            conninfo = datastore.pool.conninfo
            self._listen = psycopg.connect(conninfo, autocommit=True, **_connect_args(kwargs))
            self._listen.execute(f"LISTEN {EVENTS_CHANNEL}")
        return self._listen

    def _close_listen(self) -> None:
        if self._listen is not None:
            with suppress(Exception):
                self._listen.close()
            self._listen = None

    def close(self) -> None:
        self._close_listen()


def _connect_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    allowed = {"dbname", "host", "port", "user", "password", "connect_timeout"}
    return {k: v for k, v in kwargs.items() if k in allowed}
