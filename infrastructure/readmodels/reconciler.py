"""The continuous reconciler: a supervised service that reconciles each serving projection
version every N events or T seconds, and records every run in ``daybook_reconcile_runs``
(what ``daybook projections status`` shows). Report-only unless told to repair.

Each run is ``reconcile`` (at the owner's checkpoint, in bounded memory, no lock during the
fold). The table keeps the last ``KEPT_RUNS`` runs of each version: it does not grow with
time. A version that a switch retires during its run is skipped, and nothing is recorded for
it (a retired version's runs go with its tables); the service goes on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.lifecycle import Health, Stopping, SupervisedThread
from daybook.infrastructure.observability.logs import SUBJECT
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionState
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.reconcile import (
    ReconcileError,
    ReconcileReport,
    ReconcileStopped,
    VersionRetired,
    VersionStopped,
    reconcile,
)
from daybook.infrastructure.readmodels.store import ReadStore, now_text
from daybook.projections.model import Projection

log = logging.getLogger("daybook.reconciler")

RUNS_TABLE = "daybook_reconcile_runs"
#: Runs kept per projection version.
KEPT_RUNS = 100
#: Drifted rows described per run (the count says how many there were).
DESCRIBED = 20


@dataclass(frozen=True)
class ReconcileRun:
    name: str
    version: int
    owner: str
    position: int
    vector: list[int] | None
    ranges_checked: int
    ranges_differing: int
    drifted: int
    drifts: list[str]
    repaired: bool
    seconds: float
    finished_at: str
    error: str | None


def create_runs_table(store: ReadStore) -> None:
    store.execute(
        f"CREATE TABLE IF NOT EXISTS {RUNS_TABLE} ({store.serial_key()}, name TEXT NOT NULL,"
        " version BIGINT NOT NULL, owner TEXT NOT NULL, position BIGINT NOT NULL,"
        " vector TEXT, ranges_checked BIGINT NOT NULL, ranges_differing BIGINT NOT NULL,"
        " drifted BIGINT NOT NULL, drifts TEXT NOT NULL, repaired BIGINT NOT NULL,"
        " seconds TEXT NOT NULL, finished_at TEXT NOT NULL, error TEXT)"
    )


def record_run(store: ReadStore, run: ReconcileRun) -> bool:
    """Record ``run`` and forget the oldest of its version's runs beyond ``KEPT_RUNS``; False
    (nothing recorded) if the version has been retired meanwhile: a switch forgets a retired
    version's runs with its tables, and a run recorded after that would stay for good."""
    with store.transaction():
        create_runs_table(store)
        # Shared with other readers, not with a switch: one that retires the version waits
        # for this run to be recorded (and its drop then forgets it), or is seen here.
        record = VersionCatalog(store).version(run.name, run.version, share=True)
        if record is not None and record.state is VersionState.RETIRED:
            return False
        store.execute(
            f"INSERT INTO {RUNS_TABLE} (name, version, owner, position, vector, ranges_checked,"
            " ranges_differing, drifted, drifts, repaired, seconds, finished_at, error)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                run.name, run.version, run.owner, run.position,
                None if run.vector is None else json.dumps(run.vector),
                run.ranges_checked, run.ranges_differing, run.drifted, json.dumps(run.drifts),
                int(run.repaired), f"{run.seconds:.3f}", run.finished_at, run.error,
            ),
        )  # fmt: skip
        store.execute(
            f"DELETE FROM {RUNS_TABLE} WHERE name = %s AND version = %s AND id <= ("
            f" SELECT id FROM {RUNS_TABLE} WHERE name = %s AND version = %s"
            f" ORDER BY id DESC LIMIT 1 OFFSET {KEPT_RUNS})",
            (run.name, run.version, run.name, run.version),
        )
    return True


def last_runs(store: ReadStore) -> dict[tuple[str, int], ReconcileRun]:
    """The latest run of each projection version (none if the table does not exist)."""
    try:
        with store.transaction(write=False):
            rows = store.execute(
                "SELECT name, version, owner, position, vector, ranges_checked,"
                " ranges_differing, drifted, drifts, repaired, seconds, finished_at, error"
                f" FROM {RUNS_TABLE} r WHERE id = (SELECT max(id) FROM {RUNS_TABLE}"
                " WHERE name = r.name AND version = r.version)"
            )
    except Exception as failure:
        if store.is_missing_table(failure):
            return {}
        raise
    runs = {}
    for row in rows:
        name, version, owner, position, vector, checked, differing, drifted = row[:8]
        drifts, repaired, seconds, finished_at, error = row[8:]
        runs[(name, int(version))] = ReconcileRun(
            name, int(version), owner, int(position),
            None if vector is None else json.loads(vector), int(checked), int(differing),
            int(drifted), json.loads(drifts), bool(repaired), float(seconds), finished_at, error,
        )  # fmt: skip
    return runs


def run_of(report: ReconcileReport) -> ReconcileRun:
    return ReconcileRun(
        report.name,
        report.version,
        report.owner,
        report.position,
        None if report.vector is None else list(report.vector),
        report.ranges_checked,
        report.ranges_differing,
        report.drift_count,
        [drift.describe() for drift in report.drifts[:DESCRIBED]],
        report.repaired,
        report.seconds,
        now_text(),
        None,
    )


def failed_run(projection: Projection, error: Exception) -> ReconcileRun:
    """A run that could not fold the log (``ReconcileError``) or had nothing to check."""
    return ReconcileRun(projection.name, projection.version, "", 0, None, 0, 0, 0, [], False,
                        0.0, now_text(), str(error))  # fmt: skip


@dataclass(frozen=True)
class _LastRun:
    #: The log's head when the run was decided on (its position may be far behind it: a
    #: version whose runner is down, or a stopped one).
    head: int
    #: When it ran (monotonic seconds).
    at: float
    failed: bool


class ContinuousReconciler:
    """Reconciles the serving version of each of ``projections`` every ``every_events`` log
    events or ``every_seconds`` seconds, whichever comes first; records each run."""

    def __init__(
        self,
        log: EventLog,
        url: str,
        projections: Sequence[Projection],
        *,
        every_events: int = 100_000,
        every_seconds: float = 600.0,
        repair: bool = False,
        poll_interval: float = 1.0,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._on_close = on_close
        self.log = log
        self.url = url
        self.projections = list(projections)
        self.every_events = every_events
        self.every_seconds = every_seconds
        self.repair = repair
        self.poll_interval = poll_interval
        #: (name, version) -> its last run.
        self._last: dict[tuple[str, int], _LastRun] = {}
        self.runs = 0
        self.service = SupervisedThread(
            "continuous reconciler", self._body, on_stop=self.log.interrupt
        )

    def start(self) -> Self:
        self.service.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.service.stop(timeout)

    def health(self) -> Health:
        return self.service.health()

    def close(self) -> None:
        """Release what the service was given to own (see ``bootstrap``)."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def run_forever(self) -> Health:
        return self.service.run()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _body(self, stopping: Stopping) -> None:
        while not stopping:
            self.run_due(stopping)
            self.service.supervisor.recovered()  # a pass went through: back to work
            stopping.wait(self.poll_interval)

    def run_due(self, stopping: Stopping | None = None) -> list[ReconcileRun]:
        """Reconcile every serving version that is due; the runs recorded. Once
        ``stopping`` is set, no other version is begun."""
        done = []
        head = self.log.head()
        now = time.monotonic()
        store = open_store(self.url)
        try:
            catalog = VersionCatalog(store)
            catalog.ensure()
            active = catalog.active_versions()
            for projection in self.projections:
                if stopping:
                    # Asked to stop: the rest wait for the next start (a fold of each
                    # could take minutes on a long log; the stop limit is seconds).
                    break
                key = (projection.name, projection.version)
                if active.get(projection.name) != projection.version:
                    continue
                if not self._due(self._last.get(key), head, now):
                    continue
                try:
                    run = self._reconcile(projection, stopping)
                except VersionStopped as stopped:
                    # Not a run (nothing compared): its stream group stopped it, which
                    # status and /health say. Said again after ``every_seconds``, until a
                    # rebuild replaces it.
                    log.warning("reconciler: %s", stopped,
                                extra={SUBJECT: (projection.name, projection.version)})  # fmt: skip
                    self._last[key] = _LastRun(head, time.monotonic(), True)
                    continue
                if run is None and stopping:
                    break  # cut short by the stop: not a run
                if run is None or not record_run(store, run):
                    # A switch retired the version during the run: nothing more to do for
                    # it (the new version is reconciled by the new code's reconciler).
                    log.info("reconciler: %s v%s retired during its run; skipped",
                             projection.name, projection.version)  # fmt: skip
                    continue
                self._last[key] = _LastRun(head, time.monotonic(), run.error is not None)
                self.runs += 1
                done.append(run)
        finally:
            store.close()
        return done

    def _due(self, last: _LastRun | None, head: int, now: float) -> bool:
        """Every ``every_events`` events written since the last run (counted from the head
        it saw, not from its position: a version left behind the head would otherwise be
        due at every poll), or every ``every_seconds``. A run that failed waits the
        seconds: new events do not cure a fold that fails."""
        if last is None or now - last.at >= self.every_seconds:
            return True
        return not last.failed and head - last.head >= self.every_events

    def _reconcile(
        self, projection: Projection, stopping: Stopping | None = None
    ) -> ReconcileRun | None:
        """The run; None if the version was retired during it (skipped, not failed), or if
        ``stopping`` was set during its fold (cut short: not a run)."""
        try:
            report = reconcile(
                self.log,
                self.url,
                projection,
                repair=self.repair,
                stopping=None if stopping is None else stopping.__bool__,
            )
        except (VersionRetired, ReconcileStopped):
            return None
        except VersionStopped:
            raise  # not a failed run either (``run_due``)
        except (ReconcileError, LookupError) as error:
            log.error("reconciler: %s v%s: %s", projection.name, projection.version, error,
                      extra={SUBJECT: (projection.name, projection.version)})  # fmt: skip
            return failed_run(projection, error)
        run = run_of(report)
        if report.clean:
            log.info("reconciler: %s v%s clean at %s", report.name, report.version,
                     report.position)  # fmt: skip
        else:
            log.warning(
                "reconciler: %s v%s at position %s: %d drifted rows%s: %s",
                report.name, report.version, report.position, report.drift_count,
                " (repaired)" if report.repaired else "", "; ".join(run.drifts[:3]),
                extra={SUBJECT: (report.name, report.version)},
            )  # fmt: skip
        return run
