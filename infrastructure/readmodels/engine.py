"""The projection engine: events in, row changes out. One engine for every writer.

The in-process runner, the bulk rebuild, the stream applier, the handover and the
reconciler's fold all apply projection definitions through the pieces here, so they build
identical tables:

- ``RowCache``: committed rows of one projection version, kept across batches.
- ``BatchRows``: the careful path. Writes are buffered over the cache with an undo journal,
  so an event whose handler fails leaves no partial change; every ``put`` is checked.
- ``BulkRows``: the fast path. No journal and no check per ``put``; rows are checked once,
  when the batch is planned; new rows go by COPY, changed ones by one upsert per table.
- ``apply_careful`` and ``apply_fast``: the two loops over events.

Summed tables (``Table.summed``) are written in shards: each writer names the shard of the
event in hand (``shard``: a stream partition, or ``LOG_SHARD`` for the log's runners), reads
and writes only that shard's row, and readers add the shards up. Stream workers of different
partitions therefore never write the same row.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from daybook.infrastructure.readmodels.catalog import VersionRecord
from daybook.infrastructure.readmodels.store import LOG_SHARD, ReadStore
from daybook.infrastructure.streaming.faults import crash_point
from daybook.infrastructure.transient import is_transient
from daybook.projections.model import (
    SHARD,
    Handler,
    Key,
    LogEvent,
    Projection,
    Row,
    Table,
    Value,
    iso_time,
)

_ABSENT: Any = object()

#: One table's share of a batch: the stored table, new rows, changed rows, deleted keys.
TablePlan = tuple[Table, list[Sequence[Value]], list[Sequence[Value]], list[Key]]


class RowShapeError(ValueError):
    """A handler put a row whose columns are not exactly its table's."""


class RowCache:
    """Committed rows of one projection version, kept across batches while this writer is
    the only one. ``complete`` tables hold every row, so a miss means the row is absent.
    Rows of summed tables are kept by their stored key (the shard last)."""

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

    def merge(self, table: str, writes: Mapping[Key, Row | None]) -> None:
        """Take a committed batch's rows of ``table`` (None: deleted). A deleted row stays as
        a mark that it is absent, except in a complete table, where a miss already says so:
        there the marks of every row ever deleted (one per resolved hold) would only fill
        the cache until it is cleared, and the table would no longer be held whole."""
        rows = self.rows.get(table)
        if rows is None:
            return
        if not self.complete.get(table):
            rows.update(writes)
            return
        for key, row in writes.items():
            if row is None:
                rows.pop(key, None)
            else:
                rows[key] = row

    def warm(self, store: ReadStore, empty: bool) -> None:
        """Load small tables whole; ``empty``: the version has no rows yet."""
        self.clear()
        version = self.projection.version
        budget = self.limit
        for table in self.projection.tables:
            if table.append_only:
                continue
            if empty:
                self.complete[table.name] = True
                continue
            stored = table.stored
            count = store.count(stored, version)
            if count <= budget:
                self.rows[table.name] = {
                    stored.key_of(r): _logical(table, r) for r in store.all_rows(stored, version)
                }
                self.complete[table.name] = True
                budget -= count


def _logical(table: Table, row: Row) -> Row:
    """A stored row as its handlers see it (a summed table's without its shard)."""
    if not table.summed:
        return row
    return {name: row[name] for name in table.column_names}


@dataclass
class Slot:
    """One projection version a writer writes."""

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


class BatchRows:
    """The ``Rows`` a handler sees on the careful path: writes buffered over the cache,
    with an undo journal so that an event whose handler fails leaves no partial change."""

    def __init__(self, slot: Slot, store: ReadStore, shard: int = LOG_SHARD) -> None:
        self.slot = slot
        self.store = store
        #: The shard of summed tables the event in hand writes (set per event).
        self.shard = shard
        self.writes: dict[str, dict[Key, Row | None]] = {t.name: {} for t in slot.projection.tables}
        self.appended: dict[str, list[Row]] = {t.name: [] for t in slot.projection.tables}
        self._journal: list[tuple[str, Key | None, Any]] = []
        self._tables = {t.name: t for t in slot.projection.tables}
        self._columns = {t.name: set(t.column_names) for t in slot.projection.tables}
        self._summed = {t.name for t in slot.projection.tables if t.summed}

    def _key(self, table: str, key: Key) -> Key:
        return (*key, self.shard) if table in self._summed else key

    def get(self, table: str, key: Key) -> Row | None:
        key = self._key(table, key)
        written = self.writes[table].get(key, _ABSENT)
        if written is not _ABSENT:
            return written  # type: ignore[no-any-return]
        cache = self.slot.cache
        cached = cache.rows.get(table, {}).get(key, _ABSENT)
        if cached is not _ABSENT:
            return cached  # type: ignore[no-any-return]
        spec = self._tables[table]
        if cache.complete.get(table) or spec.append_only:
            return None
        try:
            found = self.store.fetch(spec.stored, self.slot.projection.version, key)
        except Exception as error:
            if is_transient(error):  # the batch's; a key the driver refuses is the event's
                raise StoreFailed(error) from error
            raise
        row = None if found is None else _logical(spec, found)
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
        key = self._key(table, spec.key_of(row))
        self._journal.append((table, key, self.writes[table].get(key, _ABSENT)))
        self.writes[table][key] = row

    def delete(self, table: str, key: Key) -> None:
        key = self._key(table, key)
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

    @property
    def changed(self) -> bool:
        return any(self.writes.values()) or any(self.appended.values())

    def flush(self) -> None:
        version = self.slot.projection.version
        for table in self.slot.projection.tables:
            writes = self.writes[table.name]
            stored = table.stored
            if writes:
                kept = [(k, r) for k, r in writes.items() if r is not None]
                if table.summed:
                    rows = [{**r, SHARD: k[-1]} for k, r in kept]
                else:
                    rows = [r for _, r in kept]
                self.store.upsert(stored, version, rows)
                self.store.delete(stored, version, [k for k, r in writes.items() if r is None])
            if self.appended[table.name]:
                self.store.insert(stored, version, self.appended[table.name])
            # Some of the batch's rows are written, in its open transaction: an outage can
            # start here (fault tests).
            crash_point("rows.write")

    def merge_into_cache(self) -> None:
        cache = self.slot.cache
        for table, writes in self.writes.items():
            cache.merge(table, writes)
        if cache.size() > cache.limit:
            cache.clear()


class StoreFailed(Exception):
    """A read of the read-model database failed under a handler for a reason a retry of
    the batch may cure (a lost connection, a lock not granted within the role's
    ``lock_timeout``, a deadlock, a statement the server cancelled: its
    ``statement_timeout``). It is the batch's failure: the loops over events raise
    ``error`` itself, retried as an outage, rather than take it for a bad event, retry the
    event in a transaction the database has aborted, park it and stop. (A read the driver
    refuses, a key of the wrong shape, is still the event's, parked as before.)"""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def apply_careful(
    slot: Slot,
    rows: BatchRows,
    events: Iterable[LogEvent],
    after: int,
    wanted: Callable[[LogEvent], bool] | None = None,
) -> tuple[int, str | None, Failure | None]:
    """Apply ``events`` after position ``after`` (and, if given, only the ``wanted`` ones)
    one by one, stopping at the first that fails (its changes undone). Returns the position
    reached, the time of the last event applied, and the failure if one stopped it."""
    position, last_at = after, None
    for event in events:
        if event.position <= after or (wanted is not None and not wanted(event)):
            continue
        rows.begin_event()
        try:
            slot.projection.apply(event, rows)
        except StoreFailed as failed:  # the batch's failure (an outage...), not the event's
            raise failed.error from None
        except Exception:  # a handler bug or bad event: retried, then parked
            rows.undo_event()
            return position, last_at, Failure(slot, event, traceback.format_exc(limit=5))
        position, last_at = event.position, iso_time(event.timestamp)
        slot.attempts.pop(event.position, None)
    return position, last_at, None


class BulkRows:
    """The ``Rows`` handlers see on the fast path: writes buffered over the slot's committed
    row cache, nothing else per call. (Summed tables are written to ``LOG_SHARD``: only the
    log's runners take this path.)"""

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
        self._summed = {t.name for t in slot.projection.tables if t.summed}
        for table in slot.projection.tables:
            if table.append_only:
                self.appended[table.name] = []
                continue
            writes: dict[Key, Row | None] = {}
            self.writes[table.name] = writes
            self._committed[table.name] = cache.rows[table.name]
            single = table.key[0] if len(table.key) == 1 and not table.summed else ""
            key_of: Callable[[Row], Key] = table.key_of
            if table.summed:
                key_of = _with_log_shard(table.key_of)
            self._put[table.name] = (writes, single, key_of)

    def get(self, table: str, key: Key) -> Row | None:
        if table in self._summed:
            key = (*key, LOG_SHARD)
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
        found = self.store.fetch(spec.stored, self.slot.projection.version, key)
        row = None if found is None else _logical(spec, found)
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
        if table in self._summed:
            key = (*key, LOG_SHARD)
        self.writes[table][key] = None

    def plan(self) -> list[TablePlan]:
        """What ``write`` will send, per table. Raises ``RowShapeError`` if a row's columns
        are not exactly its table's."""
        # Checked once per row written rather than at every put: a row replaced later in
        # the batch is never written, and a bad column carried forward by ``{**row, ...}``
        # is still seen. (Only a bad row that a later put rebuilds from scratch goes
        # unnoticed, where the careful path would have parked its event.)
        return [self._plan(name) for name in self._tables]

    def write(self, plans: list[TablePlan]) -> None:
        """Write the batch (inside the caller's transaction)."""
        version = self.slot.projection.version
        for table, inserts, upserts, deletes in plans:
            self.store.insert_values(table, version, inserts)
            self.store.upsert_values(table, version, upserts)
            self.store.delete(table, version, deletes)

    def _plan(self, name: str) -> TablePlan:
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
            return table.stored, inserts, upserts, deletes
        # Rows the cache knows are absent (a complete table, or a fetched miss) are new:
        # COPY them. Rows it holds, or cannot vouch for, are upserted.
        committed = self._committed[name]
        complete = bool(self.slot.cache.complete.get(name))
        shard: tuple[Value, ...] = (LOG_SHARD,) if table.summed else ()
        for key, written in self.writes[name].items():
            before = committed.get(key, _ABSENT)
            known_absent = before is None or (before is _ABSENT and complete)
            if written is None:
                if not known_absent:
                    deletes.append(key)
                continue
            values = tuple(written.values()) if tuple(written) == names else _values(table, written)
            (inserts if known_absent else upserts).append(values + shard)
        return table.stored, inserts, upserts, deletes

    def merge_into_cache(self) -> None:
        cache = self.slot.cache
        for table, writes in self.writes.items():
            cache.merge(table, writes)
        if cache.size() > cache.limit:
            cache.clear()


def _with_log_shard(key_of: Callable[[Mapping[str, Value]], Key]) -> Callable[[Row], Key]:
    def stored_key(row: Row) -> Key:
        return (*key_of(row), LOG_SHARD)

    return stored_key


def _values(table: Table, row: Row) -> tuple[Value, ...]:
    """``row``'s values in column order, if it has exactly the table's columns."""
    if len(row) != len(table.column_names) or not all(n in row for n in table.column_names):
        msg = f"{table.name} row must have exactly the columns {sorted(table.column_names)}"
        raise RowShapeError(msg)
    return tuple(row[n] for n in table.column_names)


def apply_fast(events: Iterable[LogEvent], batches: list[tuple[Slot, BulkRows]]) -> None:
    """Apply ``events`` in log order, each to every projection that handles its type (a
    projection already past an event's position skips it)."""
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
