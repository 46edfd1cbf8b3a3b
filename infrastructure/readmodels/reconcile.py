"""The reconciler: recompute read models from the log and prove the stored tables match.

At the owner's checkpoint, in bounded memory, without stopping the owner:

1. The checkpoint (a log position, or a stream group's partition vector) is read, and the
   log folded up to it through the projection engine (the bulk path, as a rebuild does) into
   scratch tables (on PostgreSQL, temporary tables of a session of its own, checksummed by
   the server; beside SQLite, a scratch file): memory holds one batch and a bounded row
   cache, never the projection. For a vector, each event counts if its partition's entry has
   reached it, and events the group parked (its dead letters) are left out, as the group
   left them out.
2. In one read snapshot of the read-model database (no lock: the owner keeps writing), the
   checkpoint is read again; the fold catches up to it (only the events since step 1); then
   both sides' tables are compared: 256 key ranges, each range's row count and checksum
   (``checksums``; computed by the database where it can), then, range by range, the rows of
   ranges that differ. If a switch (a rebuild) retired the version meanwhile, the fold
   having held no transaction, its tables are dropped or about to be: the run ends with
   ``VersionRetired`` (nothing to reconcile), also when the comparison meets them gone.
3. ``repair``: one transaction takes what the owner's writers take (the version's row, and a
   group's progress rows), checks that the checkpoint and epoch are still those compared,
   rewrites the drifted rows (a summed table's shards become one row), records each change in
   ``daybook_reconcile_log`` and moves the epoch so writers drop their caches. If the owner
   moved on meanwhile, steps 2 and 3 run again from there: a repair writes exactly the rows
   of the checkpoint it holds, never older ones.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from daybook.infrastructure.eventstore.log import EventDecoder, EventLog
from daybook.infrastructure.observability import metrics
from daybook.infrastructure.readmodels.catalog import (
    VersionCatalog,
    VersionNotFound,
    VersionRecord,
    VersionState,
)
from daybook.infrastructure.readmodels.checkpoints import (
    RUNNER,
    Vector,
    parked_for,
    read_vector,
)
from daybook.infrastructure.readmodels.engine import BulkRows, RowCache, Slot, apply_fast
from daybook.infrastructure.readmodels.handover import deadlocked, partition_of
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.postgres import PostgresStore
from daybook.infrastructure.readmodels.reconcile_log import ReconcileLog
from daybook.infrastructure.readmodels.sqlite import SqliteStore
from daybook.infrastructure.readmodels.store import ReadStore
from daybook.infrastructure.transient import is_transient
from daybook.infrastructure.urls import scheme
from daybook.projections.model import Key, LogEvent, Projection, Row, Table, sort_key

#: Events read and folded per scratch transaction.
FOLD_BATCH = 10_000
#: Rows of the fold kept in memory between batches.
FOLD_CACHE = 20_000
#: Batches between two vacuums of the scratch tables handlers change.
VACUUM_EVERY = 10
#: Drifted rows listed per projection, over all its tables (the count says how many more).
DRIFTS_LISTED = 1_000
#: How often the comparison follows an owner that moved on before a repair gives up.
REPAIR_ROUNDS = 10


class ReconcileError(Exception):
    """The log cannot be folded up to the checkpoint (an event the definition refuses)."""

    code = "reconcile_failed"


class ReconcileStopped(Exception):
    """The caller asked the run to stop (its service is stopping) while it folded the log:
    nothing was compared or repaired, and the run is not recorded."""


class VersionStopped(LookupError):
    """The version to reconcile is owned by a stream group that stopped writing it (the
    database refused its rows, or its switch met a repeated key). The group went on without
    it: its rows hold every event up to where it stopped and maybe some after, so no
    checkpoint says which events they hold, and a repair would write events it never applied
    into a version nobody follows. Rebuilding it is the way back."""

    code: ClassVar[str] = "version_stopped"


def _refuse_stopped(record: VersionRecord) -> None:
    if record.state is VersionState.STOPPED and record.stream is not None:
        raise VersionStopped(
            f"{record.name} v{record.version} is stopped: {record.owner} stopped writing it at "
            f"position {record.position} ({record.error or 'no reason recorded'}) and went on "
            "without it, so its rows cannot be compared with the log at one checkpoint, and a "
            "repair would write events it never applied. Fix the projection and rebuild it: "
            f"daybook projections rebuild {record.name}"
        )


class VersionRetired(LookupError):
    """The version to reconcile is retired, or was during the run: a switch moved reads to a
    newer version and dropped (or may drop) its tables. Nothing to reconcile: a retired
    version is never written again, and its reconcile history goes with its tables."""

    code: ClassVar[str] = "version_retired"


@dataclass(frozen=True)
class Drift:
    """One row where the stored table and the log disagree."""

    table: str
    key: Key
    kind: str  # "missing", "extra" or "different"
    expected: Row | None
    stored: Row | None
    #: The row's business key (``Table.label``), when its key does not tell a person.
    label: str = ""

    def describe(self) -> str:
        name = f"{self.table} {self.label or list(self.key)}"
        if self.kind == "different":
            assert self.expected is not None and self.stored is not None
            changes = ", ".join(
                f"{column}: {self.stored.get(column)!r} should be {value!r}"
                for column, value in self.expected.items()
                if self.stored.get(column) != value
            )
            return f"{name} different ({changes})"
        return f"{name} {self.kind}"


@dataclass
class ReconcileReport:
    name: str
    version: int
    position: int
    owner: str = RUNNER
    #: For a stream owner: per partition, the last position applied.
    vector: tuple[int, ...] | None = None
    ranges_checked: int = 0
    ranges_differing: int = 0
    rows_expected: int = 0
    drifts: list[Drift] = field(default_factory=list)
    #: Drifted rows beyond those listed.
    unlisted: int = 0
    #: Per table, the key ranges that differ (what a repair reads again and rewrites: the
    #: listed drifts are only the first ``DRIFTS_LISTED``).
    differing: dict[str, list[str]] = field(default_factory=dict)
    repaired: bool = False
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.drifts

    @property
    def drift_count(self) -> int:
        return len(self.drifts) + self.unlisted


@dataclass(frozen=True)
class _Point:
    """A checkpoint to fold to: a position, or a vector (with its partitions' parked events)."""

    position: int
    epoch: int
    vector: Vector | None = None
    parked: frozenset[int] = frozenset()


class Fold:
    """A projection folded from the log into a scratch database, advanced on demand."""

    def __init__(
        self,
        log: EventLog,
        projection: Projection,
        url: str,
        directory: Path,
        stopping: Callable[[], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.log = log
        #: Asked between batches: a fold of a long log takes minutes, a stop seconds.
        self.stopping = stopping
        #: Told after each batch how far the fold is: (position folded to, position it goes to).
        self.progress = progress
        self.projection = projection
        self.store: ReadStore
        if scheme(url) == "postgresql":
            # Temporary tables of a session of its own, in the read models' server: written
            # without WAL, checksummed by the server like the stored tables, and gone with
            # the session however it ends.
            self.store = PostgresStore(url)
            # Temporary tables live in the session's own buffers (8 MB by default), which a
            # folded table outgrows at once; settable only before the first one is made.
            self.store.execute("SET temp_buffers = '128MB'")
            with self.store.transaction():
                self.store.create_tables(projection, temporary=True)
        else:
            sqlite = SqliteStore(directory / "fold.db")
            sqlite.execute("PRAGMA synchronous=OFF")
            with sqlite.transaction():
                sqlite.create_tables(projection)
            self.store = sqlite
        record = VersionRecord(projection.name, projection.version, VersionState.LIVE, 0, 0,
                               None, "", None)  # fmt: skip
        self.slot = Slot(projection, record, RowCache(projection, FOLD_CACHE))
        self.slot.cache.warm(self.store, empty=True)
        self.decoder = EventDecoder(log.mapper, projection.handlers)
        #: Every event up to here is folded (or, for a vector, considered).
        self.done = 0
        self.partitions: Callable[[str], int] | None = None
        #: The partition count ``partitions`` maps to.
        self.count: int | None = None
        #: For a vector: per partition, every event up to here is folded.
        self.complete: list[int] | None = None
        self.batches = 0

    def advance(self, point: _Point, partitions: int | None) -> None:
        """Fold the events the checkpoint has and the fold has not.

        The checkpoint may have changed kind since the last call (a handover while the fold
        ran, without a lock): the events already folded are then those of the earlier
        checkpoint (every event up to ``done``, or each partition's up to its entry of
        ``complete`` under the earlier partitioning), and only the others are folded."""
        vector = point.vector
        wanted: Callable[[LogEvent], bool] | None = None
        folded = self._folded()
        start = self.done if self.complete is None else min(self.complete)
        if vector is None:
            end = point.position
            if folded is not None:
                wanted = _not(folded)
        else:
            assert partitions is not None
            partition = (
                self.partitions
                if self.partitions is not None and self.count == partitions
                else partition_of(partitions)
            )
            positions, parked = vector.positions, point.parked

            def wanted(event: LogEvent) -> bool:
                # (After a fold to a position, the scan starts past it: nothing to skip.)
                if folded is not None and folded(event):
                    return False
                q = partition(event.originator_id)
                return event.position <= positions[q] and event.position not in parked

            end = max(vector.furthest, vector.position)
        while start < end:
            if self.stopping is not None and self.stopping():
                raise ReconcileStopped(f"stopped while folding, after position {start}")
            raw = self.log.scan(start, min(FOLD_BATCH, end - start))
            if not raw:
                break
            events = [e for e in self.decoder.iterate(raw) if e.position <= end]
            if wanted is not None:
                events = [e for e in events if wanted(e)]
            rows = BulkRows(self.slot, self.store)
            try:
                apply_fast(events, [(self.slot, rows)])
                plan = rows.plan()
            except Exception as error:
                if is_transient(error):
                    # The scratch store (a handler's row missed the cache) did not answer:
                    # an outage to wait out, not a definition that refuses the log.
                    raise
                raise ReconcileError(
                    f"{self.projection.name} v{self.projection.version}: folding the log "
                    f"failed after position {start}: {error}"
                ) from error
            with self.store.transaction():
                rows.write(plan)
            rows.merge_into_cache()
            start = raw[-1][0]
            if self.progress is not None:
                self.progress(min(start, end), end)
            self.batches += 1
            if self.batches % VACUUM_EVERY == 0:
                self._vacuum()
        if vector is None:
            self.done, self.complete, self.partitions, self.count = end, None, None, None
        else:
            # Every event of partition q up to its bound is in the owner's tables (and so
            # folded here): the next round starts after it.
            self.complete = list(vector.bounds)
            self.partitions, self.count = partition, partitions

    def _folded(self) -> Callable[[LogEvent], bool] | None:
        """For a fold made to a vector, whether it holds an event (or left it out as the
        group did); None for a fold made to a position (every event up to ``done``)."""
        complete, partition = self.complete, self.partitions
        if complete is None or partition is None:
            return None
        return lambda event: event.position <= complete[partition(event.originator_id)]

    def _vacuum(self) -> None:
        """Temporary tables get no autovacuum: rows changed batch after batch (a running
        balance per account) would leave their dead versions to every later upsert."""
        if not isinstance(self.store, PostgresStore):
            return
        for table in self.projection.tables:
            if not table.append_only:
                self.store.execute(f"VACUUM {table.physical_name(self.projection.version)}")

    def close(self) -> None:
        self.store.close()


def _not(folded: Callable[[LogEvent], bool]) -> Callable[[LogEvent], bool]:
    def wanted(event: LogEvent) -> bool:
        return not folded(event)

    return wanted


@contextmanager
def _scratch() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="daybook-reconcile-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def reconcile(
    log: EventLog,
    url: str,
    projection: Projection,
    *,
    repair: bool = False,
    stopping: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReconcileReport:
    """Compare the stored tables of ``projection``'s version with a fold of the log.
    ``stopping`` is asked between the fold's batches: once true, ``ReconcileStopped``;
    ``progress`` is told after each how far the fold is (folded to, goes to).

    Counted in ``daybook_reconciler_runs_total`` by result: a report as clean, drift or
    repaired, and ``ReconcileError`` (a log that cannot be folded) as failed; a transient
    error (an outage, raised to be waited out) or anything else raised is not a run."""
    started = time.monotonic()
    store = open_store(url)
    try:
        catalog = VersionCatalog(store)
        catalog.ensure()
        record = catalog.version(projection.name, projection.version)
        if record is None or record.state is VersionState.RETIRED:
            state = "absent" if record is None else record.state.value
            msg = f"{projection.name} version {projection.version} is {state}; nothing to reconcile"
            if record is None:
                msg += (
                    f" (build it first: `daybook project`, or `daybook projections rebuild "
                    f"{projection.name}`)"
                )
            # Retired: a switch committed since the caller chose it (the continuous
            # reconciler skips it); absent: a name or version nobody built.
            raise VersionNotFound(msg) if record is None else VersionRetired(msg)
        _refuse_stopped(record)
        try:
            with _scratch() as directory:
                fold = Fold(log, projection, url, directory, stopping, progress)
                try:
                    report = _reconcile(store, catalog, fold, record, repair)
                finally:
                    fold.close()
        except (VersionRetired, VersionStopped, ReconcileStopped):
            raise  # not failed: a switch retired it, its group stopped it, or a stop came
        except Exception as error:
            # A log that cannot be folded is a failed run (and recorded as one), as is one
            # that fails for a reason no retry cures (a repair that cannot write: the
            # service stops on it). An outage is not: the continuous reconciler's
            # supervisor waits it out and tries again, and each of its attempts would
            # count here, while no run is recorded.
            if isinstance(error, ReconcileError) or not is_transient(error):
                metrics.RECONCILER_RUNS.labels(projection.name, "failed").inc()
            raise
        report.seconds = time.monotonic() - started
        _count(report)
        return report
    finally:
        store.close()


def _count(report: ReconcileReport) -> None:
    """A run in the metrics: by result, and the drifted rows found (repaired or not)."""
    if report.clean:
        result = "clean"
    else:
        result = "repaired" if report.repaired else "drift"
        repaired = "true" if report.repaired else "false"
        metrics.RECONCILER_DRIFT.labels(report.name, repaired).inc(report.drift_count)
    metrics.RECONCILER_RUNS.labels(report.name, result).inc()


def _reconcile(
    store: ReadStore, catalog: VersionCatalog, fold: Fold, record: VersionRecord, repair: bool
) -> ReconcileReport:
    projection = fold.projection
    with store.transaction(write=False):
        point = _point(store, catalog, record)
    fold.advance(point, record.partitions)  # the bulk of the work: no transaction open
    found: ReconcileReport | None = None  # the drift earlier rounds found and repaired
    for _ in range(REPAIR_ROUNDS):
        try:
            with store.transaction(write=False):  # one snapshot: checkpoint and rows agree
                # The fold above held no transaction: a switch (a rebuild) may have retired
                # the version meanwhile and dropped its tables.
                record = _serving(catalog, projection.name, projection.version)
                point = _point(store, catalog, record)
                fold.advance(point, record.partitions)
                report = _compare(store, fold, record, point)
        except VersionRetired:
            raise
        except Exception as error:
            # On PostgreSQL a snapshot does not hold tables it has not read yet: a switch
            # that commits after the look above drops them under the comparison.
            if not store.is_missing_table(error):
                raise
            _serving(catalog, projection.name, projection.version)
            raise
        clean = report.clean  # this round's own finding
        if found is not None:
            _carry(found, report)
        if not repair or clean:
            return report
        # Under steady writes the owner has always moved on by now (a comparison takes
        # seconds, a batch milliseconds): giving up when it had, the repair never came. The
        # fold catches up with the owner, most of the way with no lock held, the last events
        # under the owner's locks, and ``_repair`` reads the ranges that differed again from
        # both sides there: what it writes is the owner's state at that checkpoint. Events
        # applied since the comparison may have carried drift into ranges that matched (a
        # handler reads a drifted row, a statement's head, and writes another from it): the
        # next round compares again, and the run ends once a round finds nothing or its
        # owner had applied nothing since its comparison.
        for _ in range(2):  # the second picks up what the owner applied during the first
            with store.transaction(write=False):
                current = _serving(catalog, record.name, record.version)
                same = (current.owner, current.stream) == (record.owner, record.stream)
                ahead = _point(store, catalog, current) if same else None
            if ahead is None or ahead.epoch != point.epoch:
                break
            fold.advance(ahead, record.partitions)
        try:
            with store.transaction():
                locked = _locked_point(store, catalog, record)
                if locked is None or locked.epoch != point.epoch:
                    continue  # handed over, or repaired by another: compare again
                moved = locked != point
                if moved:
                    fold.advance(locked, record.partitions)  # the events since ``ahead``
                    report.position = locked.position
                    if locked.vector is not None:
                        report.vector = locked.vector.positions
                _repair(store, fold, report)
        except Exception as error:
            # A handover locks the catalog rows before the progress rows, the other way
            # round: PostgreSQL may break the cycle by aborting the repair, which then wrote
            # nothing. Compare again, as when the owner moved on.
            if not deadlocked(error):
                raise
            continue
        report.repaired = True
        if not moved:
            return report  # nothing applied since the comparison: nothing carried
        found = report
    report.repaired = False
    return report


def _carry(found: ReconcileReport, report: ReconcileReport) -> None:
    """Into ``report`` (a later round's), the drift ``found`` by earlier rounds and repaired
    there: the run reports every drifted row it met, and is repaired when its last round
    finds nothing more."""
    listed = found.drifts + report.drifts
    report.unlisted += found.unlisted + max(0, len(listed) - DRIFTS_LISTED)
    report.drifts = listed[:DRIFTS_LISTED]
    report.ranges_checked += found.ranges_checked
    report.ranges_differing += found.ranges_differing
    report.repaired = found.repaired


def _serving(
    catalog: VersionCatalog, name: str, version: int, *, lock: bool = False
) -> VersionRecord:
    """The version's catalog row; ``VersionRetired`` if a switch has retired it since the run
    began (or it is gone: a database replaced under the run)."""
    record = catalog.version(name, version, lock=lock)
    if record is None or record.state is VersionState.RETIRED:
        raise VersionRetired(
            f"{name} version {version} was retired during the run (reads switched to a newer "
            "version); nothing to reconcile"
        )
    _refuse_stopped(record)  # its group stopped writing it during the run
    return record


def _point(store: ReadStore, catalog: VersionCatalog, record: VersionRecord) -> _Point:
    stream = record.stream
    if stream is None:
        return _Point(record.position, record.epoch)
    return _vector_point(store, record, stream, read_vector(store, *stream))


def _vector_point(
    store: ReadStore, record: VersionRecord, stream: tuple[str, str, int], vector: Vector
) -> _Point:
    """The checkpoint of ``record``, owned by ``stream``, at ``vector``: the group's parked
    events of the version with it."""
    group, topic, _ = stream
    parked = parked_for(store, group, topic, record.name, record.version)
    return _Point(vector.position, record.epoch, vector, parked)


def _locked_point(
    store: ReadStore, catalog: VersionCatalog, record: VersionRecord
) -> _Point | None:
    """The checkpoint under the locks its owner's writers take, taken in their order so that
    a writer and the repair never wait for each other in a cycle: a stream group's workers
    lock their partitions' progress rows, then the version's catalog row; the runner locks
    only the row. (A handover takes them the other way round; the caller runs the repair
    again if PostgreSQL breaks that cycle by aborting it.) ``record`` names the owner the
    compare saw: None if it has changed since (a handover), and the caller compares again."""
    stream = record.stream
    vector = None if stream is None else read_vector(store, *stream, lock=True)
    # Retired since the comparison: its tables are dropped, or about to be.
    current = _serving(catalog, record.name, record.version, lock=True)
    if (current.owner, current.stream) != (record.owner, stream):
        return None
    if stream is None or vector is None:
        return _Point(current.position, current.epoch)
    return _vector_point(store, current, stream, vector)


def _compare(store: ReadStore, fold: Fold, record: VersionRecord, point: _Point) -> ReconcileReport:
    projection = fold.projection
    report = ReconcileReport(
        projection.name,
        projection.version,
        point.position,
        record.owner,
        None if point.vector is None else point.vector.positions,
    )
    for table in projection.tables:
        expected = fold.store.range_checksums(table, projection.version)
        stored = store.range_checksums(table, projection.version)
        report.rows_expected += sum(count for count, _ in expected.values())
        buckets = set(expected) | set(stored)
        report.ranges_checked += len(buckets)
        differing = sorted(b for b in buckets if expected.get(b) != stored.get(b))
        report.ranges_differing += len(differing)
        if differing:
            report.differing[table.name] = differing
        for want, have in _by_range(store, fold, table, differing):
            for drift in _drifts(table, want, have):
                if len(report.drifts) < DRIFTS_LISTED:
                    report.drifts.append(drift)
                else:
                    report.unlisted += 1
    return report


def _by_range(
    store: ReadStore, fold: Fold, table: Table, ranges: Iterable[str]
) -> Iterator[tuple[dict[Key, Row], dict[Key, Row]]]:
    """For each of ``ranges``, in order: the fold's rows in it and the stored ones, one
    range's rows in memory at a time, each side read in one pass (``rows_by_range``)."""
    wanted = set(ranges)
    version = fold.projection.version
    stored = store.rows_by_range(table, version, wanted)
    folded = fold.store.rows_by_range(table, version, wanted)
    for (mine, have), (theirs, want) in zip(stored, folded, strict=True):
        assert mine == theirs, (mine, theirs)
        yield want, have


def _drifts(table: Table, want: dict[Key, Row], have: dict[Key, Row]) -> Iterator[Drift]:
    """The rows of one key range where the fold (``want``) and the store (``have``) differ."""
    for key in sorted(set(have) | set(want), key=sort_key):
        drift = _drift(table, key, want.get(key), have.get(key))
        if drift is not None:
            yield drift


def _drift(table: Table, key: Key, want: Row | None, have: Row | None) -> Drift | None:
    either = want if want is not None else have
    label = ""
    if table.label and either is not None:
        label = " ".join(str(either.get(column)) for column in table.label)
    if want is None:
        return Drift(table.name, key, "extra", None, have, label)
    if have is None:
        return Drift(table.name, key, "missing", want, None, label)
    if _normal(table, want) != _normal(table, have):
        return Drift(table.name, key, "different", want, have, label)
    return None


def _normal(table: Table, row: Row) -> tuple[Any, ...]:
    return tuple(row.get(name) for name in table.column_names)


def _repair(store: ReadStore, fold: Fold, report: ReconcileReport) -> None:
    """Rewrite every drifted row, log every change, and tell writers their caches are stale.

    The report lists only the first ``DRIFTS_LISTED`` drifts; the repair reads each key range
    that differed again, from both sides, one range at a time (bounded memory), under the
    locks that hold the checkpoint where it was compared, and rewrites every row in it that
    differs."""
    projection = fold.projection
    version = projection.version
    # A version still being built has no key on its append-only tables yet; an upsert needs it.
    store.create_keys(projection)
    repairs = ReconcileLog(store)
    for table in projection.tables:
        for want, have in _by_range(store, fold, table, report.differing.get(table.name, ())):
            for drift in _drifts(table, want, have):
                if table.summed:
                    store.replace_total(table, version, drift.key, drift.expected)
                elif drift.kind == "extra":
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
    repairs.trim(projection.name, version)
    VersionCatalog(store).bump_epoch(projection.name, version)
