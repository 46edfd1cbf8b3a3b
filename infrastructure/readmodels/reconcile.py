"""The reconciler: recompute read models from the log and prove the stored tables match.

The expected rows come from replaying the projection in memory up to the position the stored
tables claim to reflect, read in the same snapshot as the tables (under the tracking row's
lock when repairing, so the runner cannot move on meanwhile). Tables are compared cheaply
first: rows fall into 256 key ranges, and each range's row count and checksum are computed on
both sides (``checksums``; by the database itself where it can). Only ranges whose checksums
differ are compared row by row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.readmodels import checksums
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionState
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.reconcile_log import ReconcileLog
from daybook.infrastructure.readmodels.store import ReadStore
from daybook.projections.model import Key, MemoryRows, Projection, Row, Table, sort_key

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
        catalog = VersionCatalog(store)
        catalog.ensure()
        record = catalog.version(projection.name, projection.version)
        if record is None or record.state is VersionState.RETIRED:
            state = "absent" if record is None else record.state.value
            msg = f"{projection.name} version {projection.version} is {state}; nothing to reconcile"
            raise LookupError(msg)
        replay = Replay(log, projection)
        # Most of the replay happens before any lock is taken; the rest under it.
        replay.advance(record.position)
        with store.transaction(write=repair):
            record = catalog.version(projection.name, projection.version, lock=repair)
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
    expected_sums = checksums.by_range(table, wanted.values())
    stored_sums = store.range_checksums(table, version)
    buckets = set(expected_sums) | set(stored_sums)
    report.ranges_checked += len(buckets)
    differing = {b for b in buckets if expected_sums.get(b) != stored_sums.get(b)}
    report.ranges_differing += len(differing)
    if not differing:
        return
    stored = store.rows_in_ranges(table, version, differing)
    wanted_here = {k: r for k, r in wanted.items() if checksums.range_of(k) in differing}
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
    repairs = ReconcileLog(store)
    for drift in report.drifts:
        table = projection.table(drift.table)
        if drift.kind == "extra":
            store.delete(table, version, [drift.key])
        else:
            assert drift.expected is not None
            store.upsert(table, version, [drift.expected])
        repairs.record(
            projection.name,
            version,
            report.position,
            drift.table,
            drift.key,
            drift.kind,
            drift.stored,
            drift.expected,
        )
    VersionCatalog(store).bump_epoch(projection.name, version)
