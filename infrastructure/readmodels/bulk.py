"""Bulk application of the log: rebuilds and long catch-ups, tens of thousands of events/s.

``BulkRunner`` is a ``ProjectionRunner`` (same slots, advisory locks, tracking rows checked
and moved in the same transaction as the rows, blue/green switch) whose batches are large
and cheap per event:

- the log is read as raw tuples and decoded by ``EventDecoder`` (topics resolved once,
  events no projection handles skipped before decoding);
- each event goes through a per-type list of the handlers of every projection at once;
- handlers write through ``BulkRows``: no undo journal and no column check per ``put``;
  rows are checked once each, when the batch is written;
- rows never written before go to the tables with COPY, changed ones with one upsert per
  table, through a staging table.

A batch either applies completely or changes nothing: if any handler raises, or a row has
the wrong columns, the buffered batch is dropped and the same events go through the
careful path (``ProjectionRunner._apply_batch``: undo journal, per-put checks), which applies
everything before the bad event and retries, then parks, that one exactly as the live runner
does. Both paths run the same definitions, so they build identical tables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from daybook.infrastructure.eventstore.log import EventDecoder, EventLog, RawEvent
from daybook.infrastructure.readmodels.catalog import VersionCatalog
from daybook.infrastructure.readmodels.runner import Progress, ProjectionRunner, Slot, _moved
from daybook.infrastructure.readmodels.store import ReadStore
from daybook.projections.model import (
    Handler,
    Key,
    LogEvent,
    Projection,
    Row,
    Table,
    Value,
    iso_time,
)

log = logging.getLogger(__name__)

_ABSENT: Any = object()

#: One table's share of a batch: the table, new rows, changed rows, deleted keys.
_TablePlan = tuple[Table, list[Sequence[Value]], list[Sequence[Value]], list[Key]]


class RowShapeError(ValueError):
    """A handler put a row whose columns are not exactly its table's."""


class BulkRows:
    """The ``Rows`` handlers see in a bulk batch: writes buffered over the slot's committed
    row cache, nothing else per call."""

    def __init__(self, slot: Slot, store: ReadStore) -> None:
        self.slot = slot
        self.store = store
        cache = slot.cache
        self._tables = {t.name: t for t in slot.projection.tables}
        #: table -> key -> row (None: deleted), for tables handlers read and change.
        self.writes: dict[str, dict[Key, Row | None]] = {}
        #: table -> rows, for append-only tables.
        self.appended: dict[str, list[Row]] = {}
        self._committed: dict[str, dict[Key, Row | None]] = {}
        #: table -> (its writes, its key column if it has only one, its key function)
        self._put: dict[str, tuple[dict[Key, Row | None], str, Callable[[Row], Key]]] = {}
        for table in slot.projection.tables:
            if table.append_only:
                self.appended[table.name] = []
                continue
            writes: dict[Key, Row | None] = {}
            self.writes[table.name] = writes
            self._committed[table.name] = cache.rows[table.name]
            single = table.key[0] if len(table.key) == 1 else ""
            self._put[table.name] = (writes, single, table.key_of)

    def get(self, table: str, key: Key) -> Row | None:
        row = self.writes[table].get(key, _ABSENT)
        if row is _ABSENT:
            row = self._committed[table].get(key, _ABSENT)
            if row is _ABSENT:
                row = self._miss(table, key)
        return row  # type: ignore[no-any-return]

    def _miss(self, table: str, key: Key) -> Row | None:
        spec = self._tables[table]
        if spec.append_only or self.slot.cache.complete.get(table):
            return None
        row = self.store.fetch(spec, self.slot.projection.version, key)
        self._committed[table][key] = row
        return row

    def put(self, table: str, row: Row) -> None:
        target = self._put.get(table)
        if target is None:
            self.appended[table].append(row)
        else:
            writes, single, key_of = target
            writes[(row[single],) if single else key_of(row)] = row

    def delete(self, table: str, key: Key) -> None:
        self.writes[table][key] = None

    def plan(self) -> list[_TablePlan]:
        """What ``write`` will send, per table. Raises ``RowShapeError`` if a row's columns
        are not exactly its table's."""
        # Checked once per row written rather than at every put: a row replaced later in
        # the batch is never written, and a bad column carried forward by ``{**row, ...}``
        # is still seen. (Only a bad row that a later put rebuilds from scratch goes
        # unnoticed, where the careful path would have parked its event.)
        return [self._plan(name) for name in self._tables]

    def write(self, plans: list[_TablePlan]) -> None:
        """Write the batch (inside the caller's transaction)."""
        version = self.slot.projection.version
        for table, inserts, upserts, deletes in plans:
            self.store.insert_values(table, version, inserts)
            self.store.upsert_values(table, version, upserts)
            self.store.delete(table, version, deletes)

    def _plan(self, name: str) -> _TablePlan:
        table = self._tables[name]
        names = table.column_names
        inserts: list[Sequence[Value]] = []
        upserts: list[Sequence[Value]] = []
        deletes: list[Key] = []
        if table.append_only:
            for row in self.appended[name]:
                # Rows are usually built in column order: then the check and the values
                # are two C-level calls.
                inserts.append(tuple(row.values()) if tuple(row) == names else _values(table, row))
            return table, inserts, upserts, deletes
        # Rows the cache knows are absent (a complete table, or a fetched miss) are new:
        # COPY them. Rows it holds, or cannot vouch for, are upserted.
        committed = self._committed[name]
        complete = bool(self.slot.cache.complete.get(name))
        for key, written in self.writes[name].items():
            before = committed.get(key, _ABSENT)
            known_absent = before is None or (before is _ABSENT and complete)
            if written is None:
                if not known_absent:
                    deletes.append(key)
                continue
            values = tuple(written.values()) if tuple(written) == names else _values(table, written)
            (inserts if known_absent else upserts).append(values)
        return table, inserts, upserts, deletes

    def merge_into_cache(self) -> None:
        cache = self.slot.cache
        for table, writes in self.writes.items():
            cache.rows[table].update(writes)
        if cache.size() > cache.limit:
            cache.clear()


def _values(table: Table, row: Row) -> list[Value]:
    """``row``'s values in column order, if it has exactly the table's columns."""
    if len(row) != len(table.column_names) or not all(n in row for n in table.column_names):
        msg = f"{table.name} row must have exactly the columns {sorted(table.column_names)}"
        raise RowShapeError(msg)
    return [row[n] for n in table.column_names]


class LostSlot(Exception):
    """A projection version's tracking row changed under a batch in flight (a repair, a
    retirement, another writer): the batch rolled back."""


@dataclass
class _Flight:
    """A batch being written by the writer thread, and what to report once it commits."""

    future: Future[None]
    progress: Progress


class BulkRunner(ProjectionRunner):
    """A ``ProjectionRunner`` whose every batch takes the bulk path (see the module doc).

    ``batch_size`` events make one read-model transaction; a larger batch writes each changed
    row less often (a balance changed by a hundred deposits is written once), a smaller one
    commits progress more often.

    Batches are pipelined: while one batch is written and committed by a writer thread, the
    next one is read (a reader thread fetches it ahead) and computed over the row cache as the
    written batch leaves it. If that commit fails, or finds a tracking row changed, the
    computed batch is dropped with the caches, and the runner starts again from what is
    committed, exactly as after any failed batch. The store's connection is used by one
    thread at a time: the writer's batch lands before anything else touches it.
    """

    def __init__(
        self,
        log: EventLog,
        readmodels_url: str,
        projections: Sequence[Projection],
        *,
        batch_size: int = 100_000,
        **options: Any,
    ) -> None:
        super().__init__(log, readmodels_url, projections, batch_size=batch_size, **options)
        handled = {name for p in self.projections for name in p.handlers}
        self.decoder = EventDecoder(self.log.mapper, handled)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="daybook-bulk-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="daybook-bulk-reader")
        self._flight: _Flight | None = None
        self._ahead: tuple[int, Future[list[RawEvent]]] | None = None

    def stop(self, timeout: float = 10.0) -> None:
        try:
            self._land()
        except Exception:  # already logged by whoever stops us; nothing half-written
            log.warning("bulk runner: the last batch did not commit", exc_info=True)
        super().stop(timeout)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True, cancel_futures=True)

    def _disconnect(self) -> None:
        if self._flight is not None:
            wait([self._flight.future])
            self._flight = None
        super()._disconnect()

    def step(self) -> int:
        """Apply one bulk batch; returns how many log events it read (0 when caught up)."""
        if self._flight is None:
            store = self._connect()
            self._claim_slots(store)
        else:
            assert self.store is not None
            store = self.store
        if not self.slots:
            return 0
        start = min(slot.record.position for slot in self.slots.values())
        raw = self._read(start)
        if not raw:
            self._land()
            self._switch_caught_up(store)
            return 0
        # The tracking row keeps the time of the last event read, wanted or not.
        (final,) = self.log.decoder.decode(raw[-1:])
        last, last_at = final.position, iso_time(final.timestamp)
        if len(raw) == self.batch_size and self.log.concurrent_scans:
            self._ahead = (last, self._reader.submit(self.log.scan, last, self.batch_size))
        if not self._caches_complete():
            self._land()  # handlers may fetch rows: the connection must be free
        batches = [
            (slot, BulkRows(slot, store))
            for slot in self.slots.values()
            if slot.record.position < last
        ]
        try:
            _run(self.decoder.iterate(raw), batches)
            plans = [rows.plan() for _, rows in batches]
        except Exception:  # a handler failed or put a bad row: the careful path decides
            if not self._land():
                return len(raw)
            self._ahead = None
            failures = self._apply_batch(store, self.decoder.decode(raw))
            for failure in failures:
                self._handle_failure(store, failure)
            if self.on_progress is not None:
                self.on_progress(Progress(len(raw), last, self.log.head()))
            return len(raw)
        if not self._land():
            return len(raw)  # computed on rows that did not commit: read again
        expected = [(slot.key, slot.record.position, slot.record.epoch) for slot, _ in batches]
        future = self._writer.submit(_write, store, batches, plans, expected, last, last_at)
        self._flight = _Flight(future, Progress(len(raw), last, 0))
        # Optimistic: the next batch builds on this one; ``_land`` undoes this if it fails.
        for slot, rows in batches:
            rows.merge_into_cache()
            slot.record = _moved(slot.record, last, last_at)
            if slot.attempts:
                slot.attempts = {p: n for p, n in slot.attempts.items() if p > last}
        if len(raw) < self.batch_size:
            self._land()
            self._switch_caught_up(store)
        return len(raw)

    def _read(self, start: int) -> list[RawEvent]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == start:
            return ahead[1].result()
        return self.log.scan(start, self.batch_size)

    def _caches_complete(self) -> bool:
        return all(
            slot.cache.complete.get(table.name, False)
            for slot in self.slots.values()
            for table in slot.projection.tables
            if not table.append_only
        )

    def _land(self) -> bool:
        """Wait for the batch in flight. True if it committed (or there was none); False if
        a tracking row had changed (everything is let go, to be claimed again); raises the
        database error that failed it, after dropping the caches built on it."""
        flight, self._flight = self._flight, None
        if flight is None:
            return True
        try:
            flight.future.result()
        except LostSlot as lost:
            log.info("bulk runner: %s; starting again from the committed position", lost)
            self._ahead = None
            self._disconnect()
            return False
        except BaseException:
            self._ahead = None
            self._disconnect()
            raise
        if self.on_progress is not None:
            progress = flight.progress
            self.on_progress(Progress(progress.events, progress.position, self.log.head()))
        return True


def _write(
    store: ReadStore,
    batches: list[tuple[Slot, BulkRows]],
    plans: list[list[_TablePlan]],
    expected: list[tuple[tuple[str, int], int, int]],
    last: int,
    last_at: str,
) -> None:
    """One batch's transaction (in the writer thread): check each tracking row still holds
    the position and epoch the batch was computed from, write the rows, move the positions."""
    catalog = VersionCatalog(store)
    with store.transaction():
        for (_, rows), plan, (key, position, epoch) in zip(batches, plans, expected, strict=True):
            current = catalog.version(*key, lock=True)
            if current is None or not current.state.writable:
                state = "absent" if current is None else current.state.value
                msg = f"projection {key[0]} v{key[1]} is {state}"
                raise LostSlot(msg)
            if current.position != position or current.epoch != epoch:
                msg = f"projection {key[0]} v{key[1]} was changed by another writer"
                raise LostSlot(msg)
            rows.write(plan)
            catalog.set_position(*key, last, last_at)


def _run(events: Iterable[LogEvent], batches: list[tuple[Slot, BulkRows]]) -> None:
    """Apply ``events`` in log order, each to every projection that handles its type."""
    if not batches:
        return
    start = min(slot.record.position for slot, _ in batches)
    dispatch: dict[str, list[tuple[Handler, BulkRows]]] = {}
    for slot, rows in batches:
        after = slot.record.position
        for name, handler in slot.projection.handlers.items():
            if after > start:
                handler = _after(after, handler)
            dispatch.setdefault(name, []).append((handler, rows))
    nothing: list[tuple[Handler, BulkRows]] = []
    get = dispatch.get
    for event in events:
        for handler, rows in get(event.type, nothing):
            handler(event, rows)


def _after(position: int, handler: Handler) -> Handler:
    """``handler`` for a projection that has already applied events up to ``position``."""

    def guarded(event: LogEvent, rows: Any) -> None:
        if event.position > position:
            handler(event, rows)

    return guarded
