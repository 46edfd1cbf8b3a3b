"""The in-process projection runner: follows the log and keeps read models up to date.

Exactly-once in effect: each batch of events is applied in one read-model transaction that
also moves the projection's tracking position, and that transaction first locks the
tracking row and checks it still holds the position this runner started from. A crash,
a lost connection or a second runner therefore can only make a batch roll back and be
re-read, never apply twice or skip.

One writer per projection version: the runner holds a writer lock per version (on PostgreSQL
a session advisory lock); a second runner waits as a standby and takes over when the first's
session ends. (The position check above keeps even a runner that lost its lock without
noticing, or two runners on SQLite, which has no such locks, from doing harm.)
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Self

from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.lifecycle import Health, ServiceState, Stopping, SupervisedThread
from daybook.infrastructure.readmodels.catalog import (
    IllegalTransition,
    VersionCatalog,
    VersionRecord,
    VersionState,
    version_lock_key,
)
from daybook.infrastructure.readmodels.dead_letters import DeadLetters
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.store import ReadStore, WriterLocks
from daybook.projections.model import Key, LogEvent, Projection, Row, Table, iso_time

log = logging.getLogger(__name__)

_ABSENT: Any = object()


class RowCache:
    """Committed rows of one projection version, kept across batches while this runner is
    the only writer. ``complete`` tables hold every row, so a miss means the row is absent."""

    def __init__(self, projection: Projection, limit: int) -> None:
        self.projection = projection
        self.limit = limit
        self.rows: dict[str, dict[Key, Row | None]] = {}
        self.complete: dict[str, bool] = {}
        self.clear()

    def clear(self) -> None:
        self.rows = {t.name: {} for t in self.projection.tables if not t.append_only}
        self.complete = {t.name: False for t in self.projection.tables}

    def size(self) -> int:
        return sum(len(r) for r in self.rows.values())

    def warm(self, store: ReadStore, position: int) -> None:
        """Load small tables whole; a version at position 0 has empty tables."""
        self.clear()
        version = self.projection.version
        budget = self.limit
        for table in self.projection.tables:
            if table.append_only:
                continue
            if position == 0:
                self.complete[table.name] = True
                continue
            count = store.count(table, version)
            if count <= budget:
                self.rows[table.name] = {table.key_of(r): r for r in store.all_rows(table, version)}
                self.complete[table.name] = True
                budget -= count


class BatchRows:
    """The ``Rows`` a handler sees during a batch: writes are buffered over the cache, with
    an undo journal so that an event whose handler fails leaves no partial change."""

    def __init__(self, slot: Slot, store: ReadStore) -> None:
        self.slot = slot
        self.store = store
        self.writes: dict[str, dict[Key, Row | None]] = {t.name: {} for t in slot.projection.tables}
        self.appended: dict[str, list[Row]] = {t.name: [] for t in slot.projection.tables}
        self._journal: list[tuple[str, Key | None, Any]] = []
        self._tables = {t.name: t for t in slot.projection.tables}
        self._columns = {t.name: set(t.column_names) for t in slot.projection.tables}

    def get(self, table: str, key: Key) -> Row | None:
        written = self.writes[table].get(key, _ABSENT)
        if written is not _ABSENT:
            return written  # type: ignore[no-any-return]
        cache = self.slot.cache
        cached = cache.rows.get(table, {}).get(key, _ABSENT)
        if cached is not _ABSENT:
            return cached  # type: ignore[no-any-return]
        if cache.complete.get(table) or self._tables[table].append_only:
            return None
        row = self.store.fetch(self._tables[table], self.slot.projection.version, key)
        cache.rows[table][key] = row
        return row

    def put(self, table: str, row: Row) -> None:
        spec = self._tables[table]
        if row.keys() != self._columns[table]:
            # Caught here, inside the handler call, so it is retried and parked like any
            # other failure of this event rather than failing the whole batch at flush.
            msg = f"{table} row must have exactly the columns {sorted(self._columns[table])}"
            raise ValueError(msg)
        if spec.append_only:
            self._journal.append((table, None, len(self.appended[table])))
            self.appended[table].append(row)
            return
        key = spec.key_of(row)
        self._journal.append((table, key, self.writes[table].get(key, _ABSENT)))
        self.writes[table][key] = row

    def delete(self, table: str, key: Key) -> None:
        self._journal.append((table, key, self.writes[table].get(key, _ABSENT)))
        self.writes[table][key] = None

    def begin_event(self) -> None:
        self._journal.clear()

    def undo_event(self) -> None:
        for table, key, before in reversed(self._journal):
            if key is None:
                del self.appended[table][before:]
            elif before is _ABSENT:
                self.writes[table].pop(key, None)
            else:
                self.writes[table][key] = before
        self._journal.clear()

    def flush(self) -> None:
        version = self.slot.projection.version
        for table in self.slot.projection.tables:
            writes = self.writes[table.name]
            if writes:
                self.store.upsert(table, version, [r for r in writes.values() if r is not None])
                self.store.delete(table, version, [k for k, r in writes.items() if r is None])
            if self.appended[table.name]:
                self.store.insert(table, version, self.appended[table.name])

    def merge_into_cache(self) -> None:
        cache = self.slot.cache
        for table, writes in self.writes.items():
            if table in cache.rows:
                cache.rows[table].update(writes)
        if cache.size() > cache.limit:
            cache.clear()


@dataclass
class Slot:
    """One projection version this runner writes."""

    projection: Projection
    record: VersionRecord
    cache: RowCache
    #: Failed attempts at the event at a position.
    attempts: dict[int, int] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return (self.projection.name, self.projection.version)


@dataclass(frozen=True)
class Failure:
    slot: Slot
    event: LogEvent
    error: str


@dataclass
class Progress:
    """What a batch did, for progress bars and benchmarks."""

    events: int
    position: int
    head: int


class ProjectionRunner:
    """Applies projections to their read-model tables in batches, following the log.

    Use as a context manager (a background thread), or call ``run_until_caught_up`` /
    ``run_forever`` from the calling thread. New versions of a projection are built beside the
    active one and switched to when they have caught up with the log.
    """

    def __init__(
        self,
        log: EventLog,
        readmodels_url: str,
        projections: Sequence[Projection],
        *,
        batch_size: int = 1000,
        poll_interval: float = 0.2,
        max_attempts: int = 5,
        retry_backoff: float = 0.05,
        cache_limit: int = 200_000,
        keep_old: bool = False,
        switch: bool = True,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.log = log
        self.url = readmodels_url
        self.projections = list(projections)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.cache_limit = cache_limit
        self.keep_old = keep_old
        self.switch = switch
        self.on_progress = on_progress
        self.store: ReadStore | None = None
        self._locks: WriterLocks | None = None
        self.slots: dict[tuple[str, int], Slot] = {}
        #: The runner as a service: a transient failure (the log's store or the read-model
        #: database unreachable, at any point) reconnects after a backoff; anything else
        #: stops it as FAILED with the reason, in ``health()`` and the log.
        self.service = SupervisedThread(
            "projection runner",
            self._follow,
            on_failure=lambda _: self._disconnect(),
            on_stop=self.log.interrupt,
        )
        self._stop = self.service.stopping

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Follow the log in a thread of its own (see ``service``)."""
        self.service.start()
        return self

    def request_stop(self) -> None:
        """Ask the runner to return after the batch in hand (safe in a signal handler)."""
        self._stop.set()
        self.log.interrupt()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, then stop; nothing committed is lost."""
        self.service.stop(timeout)
        self._disconnect()
        self.log.close()

    def health(self) -> Health:
        return self.service.health()

    @property
    def error(self) -> str | None:
        """Why the runner failed (None while it has not)."""
        health = self.service.health()
        return health.error if health.state is ServiceState.FAILED else None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def run_forever(self) -> Health:
        """Follow the log in this thread, supervised as ``start`` would, until stopped or
        failed; the final health says which."""
        return self.service.run()

    def _follow(self, stopping: Stopping) -> None:
        while not stopping:
            if self.step() == 0:
                self.log.wait(self.poll_interval)

    def run_until_caught_up(self, max_idle_steps: int = 1) -> None:
        """Apply everything up to the current head, then return (switches included)."""
        idle = 0
        while idle < max_idle_steps and not self._stop:
            if self.step() == 0:
                idle += 1

    # -- connections and slots --------------------------------------------------------------

    def _connect(self) -> ReadStore:
        if self.store is None:
            store = open_store(self.url)
            try:
                catalog = VersionCatalog(store)
                catalog.ensure()
                for projection in self.projections:
                    catalog.register(projection)
                self._locks = store.open_locks()
            except BaseException:
                store.close()
                raise
            self.store = store
        return self.store

    def _disconnect(self) -> None:
        for connection in (self.store, self._locks):
            if connection is not None:
                connection.close()
        self.store = None
        self._locks = None
        self.slots.clear()

    def _claim_slots(self, store: ReadStore) -> None:
        """Take every projection version we may write (free lock, live or rebuilding)."""
        assert self._locks is not None
        self._locks.check()  # a dead lock session means our locks are gone
        catalog = VersionCatalog(store)
        for projection in self.projections:
            key = (projection.name, projection.version)
            if key in self.slots:
                continue
            record = catalog.version(*key)
            if record is None:
                record = catalog.register(projection)
            if record is None or not record.state.writable:
                continue
            if not self._locks.try_take(version_lock_key(*key)):
                continue  # another runner writes it; we stand by
            record = catalog.version(*key)
            assert record is not None
            cache = RowCache(projection, self.cache_limit)
            with store.transaction(write=False):
                cache.warm(store, record.position)
            self.slots[key] = Slot(projection, record, cache)

    def _release(self, slot: Slot) -> None:
        self.slots.pop(slot.key, None)
        if self._locks is not None:
            self._locks.release(version_lock_key(*slot.key))

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> int:
        """Apply one batch; returns how many events it read (0 when caught up)."""
        store = self._connect()
        self._claim_slots(store)
        if not self.slots:
            return 0
        start = min(slot.record.position for slot in self.slots.values())
        events = self.log.read(start, self.batch_size)
        if not events:
            self._switch_caught_up(store)
            return 0
        failures = self._apply_batch(store, events)
        for failure in failures:
            self._handle_failure(store, failure)
        if self.on_progress is not None:
            self.on_progress(Progress(len(events), events[-1].position, self.log.head()))
        if len(events) < self.batch_size:
            self._switch_caught_up(store)
        return len(events)

    def _apply_batch(self, store: ReadStore, events: list[LogEvent]) -> list[Failure]:
        failures: list[Failure] = []
        batches: list[tuple[Slot, BatchRows, int, str | None]] = []
        catalog = VersionCatalog(store)
        with store.transaction():
            for slot in list(self.slots.values()):
                current = catalog.version(*slot.key, lock=True)
                if not self._still_ours(slot, current):
                    continue
                rows = BatchRows(slot, store)
                position, last_at = slot.record.position, None
                for event in events:
                    if event.position <= position:
                        continue
                    rows.begin_event()
                    try:
                        slot.projection.apply(event, rows)
                    except Exception:  # a handler bug or bad event: retried, then parked
                        rows.undo_event()
                        failures.append(Failure(slot, event, traceback.format_exc(limit=5)))
                        break
                    position, last_at = event.position, iso_time(event.timestamp)
                    slot.attempts.pop(event.position, None)
                if position == slot.record.position:
                    continue
                rows.flush()
                catalog.set_position(*slot.key, position, last_at)
                batches.append((slot, rows, position, last_at))
        # Committed: only now may the caches and positions move on.
        for slot, rows, position, last_at in batches:
            rows.merge_into_cache()
            slot.record = _moved(slot.record, position, last_at)
        return failures

    def _still_ours(self, slot: Slot, current: VersionRecord | None) -> bool:
        """Check the tracking row before writing: moved, repaired or retired under us?"""
        if current is None or not current.state.writable:
            state = "absent" if current is None else current.state.value
            log.info("projection %s v%s is %s; releasing it", *slot.key, state)
            self._release(slot)
            return False
        if current.position != slot.record.position or current.epoch != slot.record.epoch:
            # Someone else wrote these tables (a repair, or a runner that had our lock).
            slot.cache.clear()
        slot.record = current
        return True

    def _handle_failure(self, store: ReadStore, failure: Failure) -> None:
        slot, event = failure.slot, failure.event
        attempts = slot.attempts.get(event.position, 0) + 1
        slot.attempts[event.position] = attempts
        if attempts < self.max_attempts:
            log.warning(
                "projection %s v%s failed on event %s at position %s (attempt %s of %s)",
                *slot.key,
                event.type,
                event.position,
                attempts,
                self.max_attempts,
            )
            self._stop.wait(self.retry_backoff * 2 ** (attempts - 1))
            return
        log.error(
            "projection %s v%s parked event %s at position %s and stopped:\n%s",
            *slot.key,
            event.type,
            event.position,
            failure.error,
        )
        reason = (
            f"event {event.type} at position {event.position} failed {attempts} times; "
            f"see daybook_dead_letters. Last error: {failure.error.strip().splitlines()[-1]}"
        )
        try:
            with store.transaction():
                VersionCatalog(store).stop(*slot.key, reason)
                DeadLetters(store).add(
                    *slot.key,
                    event.position,
                    event.type,
                    event.originator_id,
                    failure.error,
                    attempts,
                )
        except (IllegalTransition, LookupError) as refused:
            # Retired (or stopped) by someone else meanwhile: not ours to park any more.
            log.info("projection %s v%s: %s; releasing it", *slot.key, refused)
        self._release(slot)

    def _switch_caught_up(self, store: ReadStore) -> None:
        """A rebuilding version that has reached the head replaces the active one."""
        if not self.switch:
            return
        head = self.log.head()
        catalog = VersionCatalog(store)
        for slot in list(self.slots.values()):
            if slot.record.state is not VersionState.REBUILDING or slot.record.position < head:
                continue
            with store.transaction():
                current = catalog.version(*slot.key, lock=True)
                if current is None or current.state is not VersionState.REBUILDING:
                    continue
                if current.position < head:
                    continue
                previous = catalog.active_version(slot.projection.name)
                if previous is not None and previous > slot.projection.version:
                    continue
                serving = (
                    None if previous is None else catalog.version(slot.projection.name, previous)
                )
                if serving is not None and serving.position > current.position:
                    # Readers must never see the position go backwards: catch up first.
                    continue
                # Marks the old version retired: its runner, which locks that row at the start
                # of every batch, lets go of it at its next batch.
                catalog.activate(*slot.key)
            slot.record = replace(slot.record, state=slot.record.state.activated())
            log.info("projection %s now reads from version %s", *slot.key)
            if previous is not None and previous != slot.projection.version and not self.keep_old:
                with store.transaction():
                    catalog.drop_tables(slot.projection.name, previous)


def _moved(record: VersionRecord, position: int, last_event_at: str | None) -> VersionRecord:
    return replace(record, position=position, last_event_at=last_event_at or record.last_event_at)


def tables_of(projections: Sequence[Projection]) -> list[Table]:
    return [table for projection in projections for table in projection.tables]
