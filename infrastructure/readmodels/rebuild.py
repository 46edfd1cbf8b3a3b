"""Blue/green rebuilds: a new projection version built in bulk beside the one serving reads.

The new version's tables fill from the start of the log in large batches on the bulk path
(``bulk.BulkRunner``: COPY for new rows, one upsert per table for changed ones, batches
pipelined) while the current version keeps following the log and answering queries. When the
new version reaches the head, one transaction marks it active and the old one retired; the
old tables are dropped after it (unless kept on request: ``VersionCatalog.drop_retired``).
Progress is committed with every batch, so an interrupted rebuild resumes; an outage of the
read-model database is waited out.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO, TypeVar

from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.lifecycle import ServiceState, Supervisor
from daybook.infrastructure.readmodels.bulk import BulkRunner
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionRecord, VersionState
from daybook.infrastructure.readmodels.checkpoints import RUNNER, handover_command
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.runner import Progress
from daybook.projections.model import Projection

_T = TypeVar("_T")


class RebuildError(Exception):
    """A rebuild that cannot start; the message says what to do instead."""

    code = "rebuild_refused"
    #: A rebuild of several: those built all the same (their reads switched).
    results: Sequence[RebuildResult] = ()


#: Seconds between progress lines off a terminal.
LINE_EVERY = 5.0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or the stream is closed
        return False


class ProgressBar:
    """Events done, events/s and ETA on one stderr line, redrawn at most ten times a second."""

    def __init__(self, label: str, start: int, stream: TextIO) -> None:
        self.label = label
        self.start_position = start
        self.stream = stream
        self.started = time.monotonic()
        self.events = 0
        self.drawn = 0.0
        #: Off a terminal (a file, a pipe, a collector): a line every few seconds, not a
        #: redrawn one, which would never end until the rebuild does.
        self.terminal = _is_terminal(self.stream)
        self.every = 0.1 if self.terminal else LINE_EVERY

    def __call__(self, progress: Progress) -> None:
        self.events += progress.events
        now = time.monotonic()
        if now - self.drawn < self.every and progress.position < progress.head:
            return
        self.drawn = now
        elapsed = max(now - self.started, 1e-9)
        rate = self.events / elapsed
        total = max(progress.head - self.start_position, 1)
        done = min(progress.position - self.start_position, total)
        remaining = max(progress.head - progress.position, 0)
        eta = remaining / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * done / total)
        start = "\r" if self.terminal else ""
        self.stream.write(
            f"{start}{self.label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{self.events:,} events  {rate:,.0f} events/s  "
            f"ETA {int(eta // 60)}:{int(eta % 60):02d}" + ("  " if self.terminal else "\n")
        )
        self.stream.flush()

    def close(self) -> None:
        if not self.terminal:
            return
        self.stream.write("\n")
        self.stream.flush()


@dataclass(frozen=True)
class RebuildResult:
    name: str
    version: int
    events: int
    seconds: float
    position: int
    previous_version: int | None
    resumed_from: int
    #: Built by another process while this one waited (it applied nothing itself).
    by_another: bool = False

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def rebuild(
    log: EventLog,
    url: str,
    projection: Projection,
    *,
    batch_size: int = 100_000,
    keep_old: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
    wait_interval: float = 0.5,
) -> RebuildResult:
    """Build ``projection`` at its version from the log and switch reads to it.

    An outage of the read-model database at any point (the checks before building, a
    batch, the switch of reads, its COMMIT's reply, the last look at the catalog) is waited
    out, with backoff; any other error, a refusal included, ends the rebuild at once."""
    (result,) = rebuild_together(
        log,
        url,
        [projection],
        batch_size=batch_size,
        keep_old=keep_old,
        progress=progress,
        stream=stream,
        wait_interval=wait_interval,
    )
    return result


def rebuild_together(
    log: EventLog,
    url: str,
    projections: Sequence[Projection],
    *,
    batch_size: int = 100_000,
    keep_old: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
    wait_interval: float = 0.5,
    on_progress: Callable[[Progress], None] | None = None,
) -> list[RebuildResult]:
    """``rebuild`` of several projections in one pass over the log: each event is read and
    decoded once for all of them. Each switches reads on its own, once it has caught up.
    Every projection is checked before any is registered: a refusal builds nothing.
    ``on_progress`` is called after each batch (``progress`` draws a bar besides)."""
    if not projections:
        return []
    label = _label(projections)
    name = f"rebuild of {label}"
    stream = sys.stderr if stream is None else stream  # as it is now, not at import
    prepared = prepare(url, projections, name)
    resumed_from = min(start for _, start in prepared)

    bar = ProgressBar(label, resumed_from, stream)
    counted: list[int] = []

    def each_batch(step: Progress) -> None:
        counted.append(step.events)
        if progress:
            bar(step)
        if on_progress is not None:
            on_progress(step)

    runner = BulkRunner(
        log,
        url,
        list(projections),
        batch_size=batch_size,
        keep_old=keep_old,
        on_progress=each_batch,
    )
    # After a failure the runner lets go and claims the versions again from what is
    # committed, as the runner does after any failed batch. A switch whose reply was lost is
    # found done (the version is live).
    building = Supervisor(name, on_failure=lambda _: runner.let_go())
    started = time.monotonic()
    waited: set[str] = set()

    def waiting(projection: Projection) -> None:
        if projection.name not in waited:  # said once: the wait may be a whole build
            waited.add(projection.name)
            print(
                f"{projection.name} v{projection.version}: another process is building this "
                "version (a rebuild, or a runner); waiting for it to finish (Ctrl-C stops "
                "waiting, not its build)",
                file=stream,
                flush=True,
            )

    held: set[tuple[str, int]] = set()  # the versions this process built, if only in part

    def round_() -> bool:
        try:
            return _built(runner, projections, wait_interval, waiting)
        finally:
            held.update(runner.slots)

    try:
        while not _waiting_out_outages(building, round_):
            pass
    finally:
        runner.stop()
        if progress:
            bar.close()
    seconds = time.monotonic() - started
    finals = _waiting_out_outages(Supervisor(name), lambda: _final(url, projections))
    results = [
        RebuildResult(
            projection.name,
            projection.version,
            sum(counted),
            seconds,
            0 if final is None else final.position,
            active if active != projection.version else None,
            start,
            by_another=projection.name in waited
            and (not counted or (projection.name, projection.version) not in held),
        )
        for projection, final, (active, start) in zip(projections, finals, prepared, strict=True)
    ]
    stopped = [final is not None and final.state is VersionState.STOPPED for final in finals]
    if any(stopped):
        error = RebuildError(
            "; ".join(
                f"{p.name} version {p.version} stopped: {final.error}"
                for p, final, halted in zip(projections, finals, stopped, strict=True)
                if halted and final is not None
            )
        )
        error.results = [r for r, halted in zip(results, stopped, strict=True) if not halted]
        raise error
    return results


def _label(projections: Sequence[Projection]) -> str:
    return ", ".join(f"{p.name} v{p.version}" for p in projections)


def _waiting_out_outages(supervisor: Supervisor, step: Callable[[], _T]) -> _T:
    """``step()``, again after each transient failure (logged, with backoff); any other
    error is raised as it is, unlogged: the caller tells the user, without a traceback."""
    supervisor.move(ServiceState.RUNNING)
    while True:
        try:
            result = step()
        except Exception as error:
            if not supervisor.transient(error):
                raise
            delay = supervisor.judge(error)  # logged
            if delay is None:  # restarted too often in a row
                raise
            time.sleep(delay)
            continue
        supervisor.succeeded()
        return result


def _final(url: str, projections: Sequence[Projection]) -> list[VersionRecord | None]:
    store = open_store(url)
    try:
        catalog = VersionCatalog(store)
        return [catalog.version(p.name, p.version) for p in projections]
    finally:
        store.close()


def serves(url: str, projections: Sequence[Projection]) -> list[bool]:
    """Whether each projection's version (the code's) serves reads; an outage of the
    read-model database is waited out, as in a rebuild."""

    def look() -> list[bool]:
        store = open_store(url)
        try:
            catalog = VersionCatalog(store)
            catalog.ensure()
            return [catalog.active_version(p.name) == p.version for p in projections]
        finally:
            store.close()

    return _waiting_out_outages(Supervisor("rebuild"), look)


def prepare(
    url: str, projections: Sequence[Projection], name: str = "rebuild"
) -> list[tuple[int | None, int]]:
    """``_prepare``, an outage of the read-model database waited out (see ``rebuild``)."""
    return _waiting_out_outages(Supervisor(name), lambda: _prepare(url, projections))


def _prepare(url: str, projections: Sequence[Projection]) -> list[tuple[int | None, int]]:
    """Check that each version may be built here, then register them all: for each, (the
    version serving reads, the position a resumed build starts from)."""
    store = open_store(url)
    try:
        catalog = VersionCatalog(store)
        catalog.ensure()
        actives = [_check(catalog, projection) for projection in projections]
        started = []
        for projection, active in zip(projections, actives, strict=True):
            record = catalog.register(projection)
            started.append((active, 0 if record is None else record.position))
        return started
    finally:
        store.close()


def _check(catalog: VersionCatalog, projection: Projection) -> int | None:
    """Refuse, saying what to do instead, if ``projection``'s version may not be built
    here; else the version serving its reads."""
    active = catalog.active_version(projection.name)
    existing = catalog.version(projection.name, projection.version)
    if active is not None and active > projection.version:
        msg = (
            f"{projection.name} already serves version {active}, newer than version "
            f"{projection.version} defined here; deploy the newer definition"
        )
        raise RebuildError(msg)
    live = existing is not None and existing.state is VersionState.LIVE
    if live and active == projection.version:
        msg = (
            f"{projection.name} version {projection.version} is already live; bump the "
            "projection's version to rebuild it beside this one, or run "
            f"`daybook reconcile {projection.name} --repair` to fix drifted rows"
        )
        raise RebuildError(msg)
    if existing is not None and existing.owner != RUNNER:
        msg = (
            f"{projection.name} version {projection.version} is owned by {existing.owner}, "
            "whose workers build it; to build it here instead, "
            f"{handover_command(projection.name, RUNNER)} first"
        )
        raise RebuildError(msg)
    if existing is not None and existing.state is VersionState.STOPPED:
        msg = (
            f"{projection.name} version {projection.version} stopped on a dead letter: "
            f"{existing.error}; fix the definition and bump its version, or resume it"
        )
        raise RebuildError(msg)
    return active


def _built(
    runner: BulkRunner,
    projections: Sequence[Projection],
    wait_interval: float,
    waiting: Callable[[Projection], None] = lambda _: None,
) -> bool:
    """One round of the build: True once every version serves reads (or another runner
    that holds it finished, or stopped, it); ``waiting`` is called for each that another
    holds, while it does."""
    runner.run_until_caught_up()
    pending = [
        p
        for p in projections
        if (slot := runner.slots.get((p.name, p.version))) is None
        or slot.record.state is not VersionState.LIVE
    ]
    if not pending:
        return True
    # Another runner holds a version, or (SQLite: no writer locks) wrote it beside us and
    # may have switched reads to it already: the catalog says whether the job is done.
    assert runner.store is not None
    catalog = VersionCatalog(runner.store)
    others = []
    for projection in pending:
        current = catalog.version(projection.name, projection.version)
        if current is None or current.state is not VersionState.REBUILDING:
            continue
        if (projection.name, projection.version) in runner.slots:
            return False  # ours, still being built
        others.append(projection)
    if not others:
        return True
    for projection in others:
        waiting(projection)
    time.sleep(wait_interval)  # another runner's: wait for it to finish the job
    return False
