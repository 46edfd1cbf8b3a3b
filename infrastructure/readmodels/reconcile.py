"""The reconciler: recompute read models from the log and prove the stored tables match.

The expected rows come from replaying the projection in memory up to the position the stored
tables claim to reflect, read in the same snapshot as the tables (under the tracking row's
lock when repairing, so the runner cannot move on meanwhile). Tables are compared cheaply
first: rows fall into 256 key ranges (by the first byte of the MD5 of the key), and each
range's row count and checksum are computed on both sides (inside PostgreSQL for stored
rows). Only ranges whose checksums differ are compared row by row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.readmodels.store import (
    LIVE,
    REBUILDING,
    PostgresStore,
    ReadStore,
    open_store,
)
from daybook.projections.model import Key, MemoryRows, Projection, Row, Table, Value, sort_key

_SEP = "\x1f"
_NULL = "\\N"
_READ_CHUNK = 10_000


@dataclass(frozen=True)
class Drift:
    """One row where the stored table and the log disagree."""

    table: str
    key: Key
    kind: str  # "missing", "extra" or "different"
    expected: Row | None
    stored: Row | None

    def describe(self) -> str:
        if self.kind == "different":
            assert self.expected is not None and self.stored is not None
            changes = ", ".join(
                f"{name}: {self.stored.get(name)!r} should be {value!r}"
                for name, value in self.expected.items()
                if self.stored.get(name) != value
            )
            return f"{self.table} {list(self.key)} different ({changes})"
        return f"{self.table} {list(self.key)} {self.kind}"


@dataclass
class ReconcileReport:
    name: str
    version: int
    position: int
    ranges_checked: int = 0
    ranges_differing: int = 0
    rows_expected: int = 0
    drifts: list[Drift] = field(default_factory=list)
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not self.drifts


def _text(value: Value) -> str:
    return _NULL if value is None else str(value)


def _bucket(key: Key) -> str:
    return hashlib.md5(_SEP.join(_text(v) for v in key).encode()).hexdigest()[:2]


def _row_sum(table: Table, row: Row) -> int:
    text = _SEP.join(_text(row[name]) for name in table.column_names)
    return int(hashlib.md5(text.encode()).hexdigest()[:15], 16)


def _checksums(table: Table, rows: Iterable[Row]) -> dict[str, tuple[int, int]]:
    sums: dict[str, tuple[int, int]] = {}
    for row in rows:
        bucket = _bucket(table.key_of(row))
        count, total = sums.get(bucket, (0, 0))
        sums[bucket] = (count + 1, total + _row_sum(table, row))
    return sums


def _sql_text(columns: Iterable[str]) -> str:
    return (
        "concat_ws(E'\\x1f', "
        + ", ".join(f"coalesce({name}::text, E'\\\\N')" for name in columns)
        + ")"
    )


def _stored_checksums(store: ReadStore, table: Table, version: int) -> dict[str, tuple[int, int]]:
    if not isinstance(store, PostgresStore):
        return _checksums(table, store.all_rows(table, version))
    key_text, row_text = _sql_text(table.key), _sql_text(table.column_names)
    rows = store.execute(
        f"SELECT substr(md5({key_text}), 1, 2), count(*),"
        f" sum(('x' || substr(md5({row_text}), 1, 15))::bit(60)::bigint)"
        f" FROM {table.physical_name(version)} GROUP BY 1"
    )
    return {bucket: (int(count), int(total)) for bucket, count, total in rows}


def _stored_rows(store: ReadStore, table: Table, version: int, buckets: set[str]) -> dict[Key, Row]:
    if isinstance(store, PostgresStore):
        rows: Iterable[Row] = store.select(
            table, version, f"substr(md5({_sql_text(table.key)}), 1, 2) = ANY(%s)", [list(buckets)]
        )
    else:
        rows = store.all_rows(table, version)
    return {table.key_of(row): row for row in rows if _bucket(table.key_of(row)) in buckets}


class Replay:
    """A projection rebuilt in memory from the log, advanced on demand."""

    def __init__(self, log: EventLog, projection: Projection) -> None:
        self.log = log
        self.projection = projection
        self.rows = MemoryRows(projection)
        self.position = 0

    def advance(self, to: int) -> None:
        while self.position < to:
            events = self.log.read(self.position, min(_READ_CHUNK, to - self.position))
            if not events:
                break
            for event in events:
                if event.position > to:
                    return
                self.projection.apply(event, self.rows)
                self.position = event.position


def reconcile(
    log: EventLog, url: str, projection: Projection, *, repair: bool = False
) -> ReconcileReport:
    """Compare the stored tables of ``projection``'s version with a replay of the log."""
    store = open_store(url)
    try:
        store.ensure_catalog()
        record = store.version(projection.name, projection.version)
        if record is None or record.state not in (LIVE, REBUILDING, "stopped"):
            state = "absent" if record is None else record.state
            msg = f"{projection.name} version {projection.version} is {state}; nothing to reconcile"
            raise LookupError(msg)
        replay = Replay(log, projection)
        # Most of the replay happens before any lock is taken; the rest under it.
        replay.advance(record.position)
        with store.transaction(write=repair):
            record = store.version(projection.name, projection.version, lock=repair)
            assert record is not None
            replay.advance(record.position)
            report = ReconcileReport(projection.name, projection.version, record.position)
            for table in projection.tables:
                _compare(store, table, projection.version, replay.rows, report)
            if repair and report.drifts:
                _repair(store, projection, report)
                report.repaired = True
        return report
    finally:
        store.close()


def _compare(
    store: ReadStore, table: Table, version: int, expected: MemoryRows, report: ReconcileReport
) -> None:
    wanted = expected.tables[table.name]
    report.rows_expected += len(wanted)
    expected_sums = _checksums(table, wanted.values())
    stored_sums = _stored_checksums(store, table, version)
    buckets = set(expected_sums) | set(stored_sums)
    report.ranges_checked += len(buckets)
    differing = {b for b in buckets if expected_sums.get(b) != stored_sums.get(b)}
    report.ranges_differing += len(differing)
    if not differing:
        return
    stored = _stored_rows(store, table, version, differing)
    wanted_here = {k: r for k, r in wanted.items() if _bucket(k) in differing}
    for key in sorted(set(stored) | set(wanted_here), key=sort_key):
        want, have = wanted_here.get(key), stored.get(key)
        if want is None:
            report.drifts.append(Drift(table.name, key, "extra", None, have))
        elif have is None:
            report.drifts.append(Drift(table.name, key, "missing", want, None))
        elif _normal(table, want) != _normal(table, have):
            report.drifts.append(Drift(table.name, key, "different", want, have))


def _normal(table: Table, row: Row) -> tuple[Any, ...]:
    return tuple(row.get(name) for name in table.column_names)


def _repair(store: ReadStore, projection: Projection, report: ReconcileReport) -> None:
    """Rewrite drifted rows, log every change, and tell runners their caches are stale."""
    version = projection.version
    for drift in report.drifts:
        table = projection.table(drift.table)
        if drift.kind == "extra":
            store.delete(table, version, [drift.key])
        else:
            assert drift.expected is not None
            store.upsert(table, version, [drift.expected])
        store.record_repair(
            projection.name,
            version,
            report.position,
            drift.table,
            drift.key,
            drift.kind,
            drift.stored,
            drift.expected,
        )
    store.bump_epoch(projection.name, version)
