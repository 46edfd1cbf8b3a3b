"""The event log, read-only: events after a position, the head, and waiting for it to grow.

Everything that follows the log (the projection runner, rebuilds, the reconciler, status, the
outbox relay) reads it through an ``EventLog``, which needs only the store's recorder and the
codec: no ledger, no committer, nothing that writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from eventsourcing.persistence import InterfaceError, Notification, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresDatastore
from eventsourcing.utils import retry
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

from daybook.infrastructure.codec import ContractMapper, OrjsonTranscoder, event_class_of
from daybook.infrastructure.compat.eventsourcing import listen_conninfo
from daybook.infrastructure.streaming.faults import crash_point
from daybook.infrastructure.transient import may_only_read
from daybook.infrastructure.urls import keep_server_probing
from daybook.projections.model import LogEvent, parse_time

#: eventsourcing's PostgreSQL recorder NOTIFYs this channel in every insert transaction.
EVENTS_CHANNEL = "daybook_events"

#: A stored event as read from the log: position, topic, originator id (text), originator
#: version, state (bytes, as the mapper wrote them).
RawEvent = tuple[int, str, str, int, bytes]


@dataclass(frozen=True, slots=True)
class _Topic:
    """What decoding needs to know about one stored topic, worked out once."""

    type: str
    wanted: bool
    version: int
    upcasts: tuple[Callable[[dict[str, Any]], None], ...]


class EventDecoder:
    """Stored events to ``LogEvent``s, with exactly ``ContractMapper.decode_state``'s result
    (JSON values, upcast to the current schema), but cheaper per event: the topic is resolved
    once, not per event, and an event of a type nobody asked for is skipped before decoding.

    There is no validation to skip here, on purpose: every event was validated against its
    pydantic contract when it was created, before it was written, and the log is
    append-only; ``decode_state`` does not validate either. A mapper with a cipher, a
    compressor or another transcoder is simply called for each event.
    """

    def __init__(self, mapper: ContractMapper, types: Collection[str] | None = None) -> None:
        self.mapper = mapper
        self.types = None if types is None else frozenset(types)
        self._topics: dict[str, _Topic] = {}
        self._direct = (
            isinstance(mapper.transcoder, OrjsonTranscoder)
            and not mapper.cipher
            and not mapper.compressor
        )

    def _topic(self, topic: str) -> _Topic:
        info = self._topics.get(topic)
        if info is None:
            name = topic.rpartition(":")[2]
            # None for a type only newer code defines: passed as written (``event_class_of``).
            event_class = event_class_of(topic)
            current = getattr(event_class, "class_version", 1)
            info = _Topic(
                name,
                self.types is None or name in self.types,
                current,
                tuple(getattr(event_class, f"upcast_v{v}_v{v + 1}") for v in range(1, current)),
            )
            self._topics[topic] = info
        return info

    def decode(self, raw: Iterable[RawEvent]) -> list[LogEvent]:
        """The wanted events among ``raw``, in the same order."""
        return list(self.iterate(raw))

    def iterate(self, raw: Iterable[RawEvent]) -> Iterator[LogEvent]:
        """The wanted events among ``raw``, decoded one at a time as they are consumed (so
        each event's timestamp text is still memoised when its handlers format it)."""
        topics = self._topics
        loads = orjson.loads
        direct = self._direct
        new_event = tuple.__new__
        for position, topic, originator_id, originator_version, data in raw:
            info = topics.get(topic) or self._topic(topic)
            if not info.wanted:
                continue
            if direct:
                state: dict[str, Any] = loads(data)
                stored_version = state.pop("class_version", 1)
                if stored_version != info.version:
                    for upcast in info.upcasts[stored_version - 1 :]:
                        upcast(state)
                state["originator_id"] = originator_id
                state["originator_version"] = originator_version
            else:
                state = self.mapper.decode_state(
                    StoredEvent(originator_id, originator_version, topic, data)
                )
            timestamp = state["timestamp"]
            # tuple.__new__ is what LogEvent(...) calls, minus a Python frame.
            yield new_event(
                LogEvent,
                (
                    position,
                    info.type,
                    originator_id,
                    originator_version,
                    parse_time(timestamp) if isinstance(timestamp, str) else timestamp,
                    state,
                ),
            )


_log = logging.getLogger(__name__)

#: Seconds between two tries at LISTEN on a server that refused it (a hot standby, which
#: may be promoted meanwhile); in between, new events are found by polling alone.
LISTEN_RETRY_SECONDS = 60.0


def _no_guard() -> None:
    """Every read of the store allowed."""


class EventLog:
    """One event store's log: events after a position, the head, and new-event wake-ups.

    On PostgreSQL a LISTEN connection wakes the reader as soon as events commit; waits are
    still bounded by the poll interval, so a lost notification or a dropped listen connection
    only costs one interval, never a stall. A hot standby (a read replica) refuses LISTEN:
    there the reader polls, and tries LISTEN again once a minute (the standby may have been
    promoted), rather than open a connection to be refused at every wait. ``close`` releases
    what the log opened itself (its listen connection, and whatever ``on_close`` releases:
    the store's connections when the log opened them).
    """

    def __init__(
        self,
        recorder: Any,
        mapper: Any,
        *,
        on_close: Callable[[], None] | None = None,
        guard: Callable[[], None] | None = None,
    ) -> None:
        """``guard`` is called before each read of the store, and may refuse it (a ledger's
        own log, in a child forked after the ledger was opened: ``refuse_if_forked``)."""
        if not isinstance(mapper, ContractMapper):
            msg = "the event log needs daybook's ContractMapper (open it with open_event_log)"
            raise TypeError(msg)
        self.recorder: Any = recorder
        self.mapper = mapper
        self.decoder = EventDecoder(mapper)
        self._on_close = on_close
        self._guard = guard or _no_guard
        self._listen: psycopg.Connection[Any] | None = None
        #: While LISTEN is refused (a hot standby): when to try it again.
        self._listen_refused_until = 0.0
        self._interrupt = threading.Event()
        #: The channel its ledger's commits notify (``postgres.events_channel``).
        self._channel: str = getattr(recorder, "channel_name", EVENTS_CHANNEL)
        datastore = getattr(recorder, "datastore", None)
        self._scan_sql: Any = None
        self._scan_head_sql: Any = None
        self._topics_sql: Any = None
        if isinstance(datastore, PostgresDatastore):
            self._topics_sql = SQL("SELECT topic, count(*) FROM {}.{} GROUP BY topic").format(
                Identifier(datastore.schema), Identifier(recorder.events_table_name)
            )
            self._scan_sql = SQL(
                "SELECT notification_id, topic, originator_id::text, originator_version, state"
                " FROM {}.{} WHERE notification_id > %s ORDER BY notification_id LIMIT %s"
            ).format(Identifier(datastore.schema), Identifier(recorder.events_table_name))
            self._scan_head_sql = SQL("SELECT COALESCE(max(notification_id), 0) FROM {}.{}").format(
                Identifier(datastore.schema), Identifier(recorder.events_table_name)
            )

    @property
    def concurrent_scans(self) -> bool:
        """Whether ``scan`` may run in another thread while this one reads the log too."""
        return self._scan_sql is not None

    def read(self, after: int, limit: int) -> list[LogEvent]:
        """Up to ``limit`` events with positions greater than ``after``, in log order."""
        return self.decoder.decode(self.scan(after, limit))

    def scan(self, after: int, limit: int) -> list[RawEvent]:
        """Up to ``limit`` stored events with positions greater than ``after``, undecoded."""
        self._guard()
        crash_point("log.read")
        if self._scan_sql is not None:
            rows: list[RawEvent] = self._scan_postgres(after, limit)
            return rows
        notifications = self.recorder.select_notifications(
            after + 1, limit, inclusive_of_start=True
        )
        return [
            (n.id, n.topic, str(n.originator_id), n.originator_version, n.state)
            for n in notifications
        ]

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def _scan_postgres(self, after: int, limit: int) -> Any:
        # Binary tuples straight from the driver: no dict rows, no Notification objects.
        with (
            self.recorder.datastore.get_connection() as conn,
            conn.cursor(binary=True, row_factory=tuple_row) as cursor,
        ):
            cursor.execute(self._scan_sql, (after, limit), prepare=True)
            return cursor.fetchall()

    def type_counts(self, chunk: int = 10_000) -> dict[str, int]:
        """How many events of each type (``LogEvent.type``) the log holds: one grouped
        count on PostgreSQL, a scan of the log (nothing decoded) elsewhere."""
        self._guard()
        counts: dict[str, int] = {}
        if self._topics_sql is not None:
            with (
                self.recorder.datastore.get_connection() as conn,
                conn.cursor(row_factory=tuple_row) as cursor,
            ):
                rows = cursor.execute(self._topics_sql).fetchall()
            pairs = [(str(topic), int(count)) for topic, count in rows]
        else:
            pairs = []
            after = 0
            while batch := self.scan(after, chunk):
                pairs.extend((topic, 1) for _, topic, _, _, _ in batch)
                after = batch[-1][0]
        for topic, count in pairs:
            kind = topic.rpartition(":")[2]
            counts[kind] = counts.get(kind, 0) + count
        return counts

    def head(self) -> int:
        self._guard()
        return int(self.recorder.max_notification_id() or 0)

    def glance(
        self, positions: Iterable[int], seconds: float
    ) -> tuple[int, dict[int, LogEvent]] | None:
        """The head, and the first event after each of ``positions`` (those before the
        head), if the store answers within about ``seconds``; None if it does not. No
        retries and no long wait for a connection: for gauges while something else fails
        (see ``ProjectionRunner._hold_lag``), never for what is applied."""
        wanted = set(positions)
        self._guard()
        try:
            if self._scan_sql is None:  # SQLite, memory: local, nothing to wait out
                head = self.head()
                return head, {p: e for p in wanted if p < head for e in self.read(p, 1)}
            datastore = self.recorder.datastore
            with (
                datastore.pool.connection(timeout=seconds) as conn,
                conn.cursor(binary=True, row_factory=tuple_row) as cursor,
            ):
                cursor.execute(self._scan_head_sql)
                row = cursor.fetchone()
                head = int(row[0]) if row else 0
                first: dict[int, LogEvent] = {}
                for position in wanted:
                    if position < head:
                        cursor.execute(self._scan_sql, (position, 1))
                        for event in self.decoder.decode(cursor.fetchall()):
                            first[position] = event
            return head, first
        except Exception as error:  # away, or slow to answer: nothing to measure against
            _log.debug("event log: no glance within %ss: %s", seconds, error)
            return None

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
                conn.execute(SQL("NOTIFY {}").format(Identifier(self._channel)))

    def wait(self, timeout: float) -> None:
        """Return when new events may have arrived, or after ``timeout`` seconds."""
        datastore = getattr(self.recorder, "datastore", None)
        if (
            not isinstance(datastore, PostgresDatastore)
            or time.monotonic() < self._listen_refused_until
        ):
            self._interrupt.wait(timeout)
            self._interrupt.clear()
            return
        try:
            if self._listen is None or self._listen.closed:
                # Listening starts now: what committed between the caller's last read and
                # this LISTEN sent its notification to nobody. Return at once so the caller
                # reads again; from here on, every commit's notification waits on this
                # connection until the next wait takes it.
                self._listen_connection(datastore)
                return
            connection = self._listen_connection(datastore)
            for _ in connection.notifies(timeout=timeout, stop_after=1):
                break
            # Drain anything else already queued so the next wait blocks again.
            for _ in connection.notifies(timeout=0):
                pass
        except psycopg.Error as error:
            self.stop_listening()
            if may_only_read(error):
                if not self._listen_refused_until:
                    _log.info(
                        "the event store refuses LISTEN (%s): new events are found by polling "
                        "alone, and LISTEN is tried again every %.0f s",
                        str(error).strip(), LISTEN_RETRY_SECONDS,
                    )  # fmt: skip
                self._listen_refused_until = time.monotonic() + LISTEN_RETRY_SECONDS
                self._interrupt.wait(timeout)
            else:
                self._interrupt.wait(min(timeout, 0.5))
            self._interrupt.clear()

    def drain(self) -> None:
        """Read the notifications already waiting on the listen connection, without
        waiting: for a reader that found events and reads again at once. Under steady load
        it never waits, and notifications it never reads hold back the server's queue as
        a reader that stopped waiting does (see ``stop_listening``)."""
        listen = self._listen
        if listen is None or listen.closed:
            return
        try:
            for _ in listen.notifies(timeout=0):
                pass
        except psycopg.Error:
            self.stop_listening()  # the next wait listens again, and returns at once

    def _listen_connection(self, datastore: Any) -> psycopg.Connection[Any]:
        if self._listen is None or self._listen.closed:
            conninfo, settings = listen_conninfo(datastore)
            self._listen = psycopg.connect(conninfo, autocommit=True, **settings)
            keep_server_probing(self._listen)  # a LISTEN holds the server's queue back
            self._listen.execute(SQL("LISTEN {}").format(Identifier(self._channel)))
            if self._listen_refused_until:
                self._listen_refused_until = 0.0
                _log.info("the event store accepts LISTEN again: new events wake the reader")
        return self._listen

    def stop_listening(self) -> None:
        """Close the listen connection (the next ``wait`` opens one again). A reader that
        stops waiting must: a listening session nobody reads holds back the server's
        notification queue, which every commit adds to, until commits fail when it is full."""
        if self._listen is not None:
            with suppress(Exception):
                self._listen.close()
            self._listen = None

    def notifications(self, after: int, limit: int) -> list[Notification]:
        """Up to ``limit`` stored events after ``after``, as the recorder gives them."""
        self._guard()
        crash_point("log.read")
        return list(self.recorder.select_notifications(after, limit, inclusive_of_start=False))

    def close(self) -> None:
        self.stop_listening()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()
