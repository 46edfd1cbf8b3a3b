"""Rebuilds spread over several processes: ``daybook projections rebuild --jobs N``.

A bulk rebuild is bound by one interpreter: its main thread runs every handler of every
projection for every event, and Python runs one thread at a time. Projections are
independent (each version has its own tables, tracking row and writer lock), so N processes,
each rebuilding its share of them in one pass over the log (``rebuild_together``), use N
cores; each reads the log, and decodes only the events its share handles.

Shares are dealt by weight, heaviest first, each to the lightest share so far: a projection's
weight is the number of log events of the types it handles (one grouped count on PostgreSQL).

Each process is started fresh (``spawn``: nothing of this one's connections or threads is
inherited), reports its batches and its end through a pipe of its own (never a channel
shared with the others: one killed while it held a shared channel's lock would silence
the rest for good), and builds exactly as a
rebuild of its share alone would: a process that dies (killed, out of memory) leaves its
versions where their last batch committed, and running the command again resumes them.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait
from types import FrameType
from typing import Any, TextIO

from daybook import projections as projections_module
from daybook.infrastructure.bootstrap import open_event_log
from daybook.infrastructure.collector import collector_paused
from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.readmodels.rebuild import (
    ProgressBar,
    RebuildError,
    RebuildResult,
    prepare,
    rebuild_together,
)
from daybook.infrastructure.readmodels.runner import Progress
from daybook.infrastructure.settings import Settings
from daybook.infrastructure.transient import first_line
from daybook.projections.model import Projection


def _defined(name: str) -> Projection | None:
    try:
        return projections_module.by_name(name)
    except KeyError:
        return None


def weights(log: EventLog, projections: Sequence[Projection]) -> dict[str, int]:
    """Each projection's weight: the log's events of the types it handles."""
    counts = log.type_counts()
    return {p.name: sum(counts.get(kind, 0) for kind in p.handlers) for p in projections}


def shares(
    projections: Sequence[Projection], weight: dict[str, int], jobs: int
) -> list[list[Projection]]:
    """``projections`` dealt into at most ``jobs`` non-empty shares of about equal weight:
    heaviest first, each to the lightest share so far (of equals, the one with fewer
    projections, then the first)."""
    dealt: list[list[Projection]] = [[] for _ in range(max(1, jobs))]
    totals = [0] * len(dealt)
    for projection in sorted(projections, key=lambda p: -weight.get(p.name, 0)):
        # Of equal weights, the share with fewer projections: none stays empty while
        # another holds two, so as many processes run as the command says.
        lightest = min(range(len(dealt)), key=lambda i: (totals[i], len(dealt[i])))
        dealt[lightest].append(projection)
        totals[lightest] += weight.get(projection.name, 0)
    return [share for share in dealt if share]


class RebuildJobFailed(RebuildError):
    """A process of a rebuild spread over several ended without finishing its share (or
    failed on an error other than a refusal): running the command again resumes it."""

    code = "rebuild_failed"
    verdict = "failed"  # not refused: running the command again finishes it


@dataclass
class _Share:
    projections: list[Projection]
    process: Any
    #: This end of the process's report pipe (None once it has said all it will).
    reader: Any
    #: The process's end, closed here once the process has started.
    writer: Any
    position: int | None = None
    head: int = 0
    results: list[RebuildResult] | None = None
    error: str | None = None
    #: Its process failed (ended unfinished, or an error other than a refusal).
    failed: bool = False

    @property
    def pending(self) -> bool:
        return self.results is None and self.error is None


def rebuild_in_processes(
    settings: Settings,
    url: str,
    projections: Sequence[Projection],
    *,
    jobs: int,
    log: EventLog,
    batch_size: int = 100_000,
    keep_old: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
) -> list[RebuildResult]:
    """Rebuild ``projections`` (each as ``rebuild`` does) in up to ``jobs`` processes, one
    share each, with one progress bar over them all. ``settings`` names the event store the
    processes read; ``log`` is this process's view of it (for the weights, and the whole
    rebuild when one process is all there is to use: ``rebuild_together`` here).

    Raises ``RebuildError`` if a share was refused (nothing of it built), or
    ``RebuildJobFailed`` if a process ended without finishing (what it committed stays, and
    a new run resumes it); the shares of the other processes are finished either way."""
    if jobs <= 1 or len(projections) <= 1:
        return rebuild_together(
            log,
            url,
            projections,
            batch_size=batch_size,
            keep_old=keep_old,
            progress=progress,
            stream=stream,
        )
    stream = sys.stderr if stream is None else stream
    for projection in projections:
        if _defined(projection.name) is not projection:
            msg = (
                f"projection {projection.name} is not in daybook.projections.ALL: a new "
                "process finds a projection there, by name"
            )
            raise ValueError(msg)
    # Every projection checked (and registered) before any process starts: a refusal
    # builds nothing, as in one process.
    prepare(url, projections)
    dealt = shares(projections, weights(log, projections), jobs)
    context = multiprocessing.get_context("spawn")
    running: list[_Share] = []
    for index, part in enumerate(dealt):
        reader, writer = context.Pipe(duplex=False)
        names = [p.name for p in part]
        process = context.Process(
            target=_rebuild_share,
            args=(index, settings, url, names, batch_size, keep_old, writer),
            name=f"daybook-rebuild-{index}",
        )
        running.append(_Share(part, process, reader, writer))
    bar = ProgressBar(f"{len(projections)} projections in {len(dealt)} processes", 0, stream)
    try:
        with _terminated_as_interrupted():
            for share in running:
                share.process.start()
                share.writer.close()  # the process's own copy is its only one: EOF = gone
            _follow(running, bar if progress else None)
    except BaseException:
        for share in running:  # a Ctrl-C reached them too; anything else: stop them
            if share.process.is_alive():
                share.process.terminate()
        raise
    finally:
        for share in running:
            if share.process.pid is not None:  # (an interrupt may come between two starts)
                share.process.join()
            share.writer.close()
            if share.reader is not None:
                share.reader.close()
        if progress:
            bar.close()
    results = [result for share in running for result in share.results or []]
    errors = [share.error for share in running if share.error is not None]
    if errors:
        failed = RebuildJobFailed if any(s.failed for s in running) else RebuildError
        error = failed("; ".join(errors))
        error.results = results  # the shares that finished: their reads switched
        raise error
    return results


@contextmanager
def _terminated_as_interrupted() -> Iterator[None]:
    """SIGTERM (a service manager stopping the command) ends the wait as Ctrl-C does, so
    the processes are stopped too rather than left building on their own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end_with_parent() -> None:
    """Linux: this process gets SIGTERM when the one that started it dies (SIGKILL
    included), rather than build on unwatched. Elsewhere nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


#: prctl(2)'s option: the signal sent when the parent dies.
_PR_SET_PDEATHSIG = 1


#: Seconds the processes' reports are waited for at a time (see ``_follow``).
_SIGNAL_LATENCY = 0.2


def _follow(running: list[_Share], bar: ProgressBar | None) -> None:
    """Take the processes' reports until each has ended, drawing ``bar`` over them all.

    Each process has a pipe of its own, read in order: once a process has ended, its pipe is
    read to its end (EOF: every copy of its writing end is closed) before it is judged, so a
    process that ended without its last report is known at once and for sure."""
    while any(share.pending for share in running):
        readers = {s.reader: s for s in running if s.reader is not None}
        # A process whose pipe is closed but that has not ended yet: its end is awaited.
        ending = {s.process.sentinel: s for s in running if s.reader is None and s.pending}
        # Bounded: a signal (Ctrl-C, SIGTERM) that one of this process's other threads (the
        # connection pool's) receives interrupts no wait of this one; its handler runs only
        # once this thread runs Python again.
        for ready in wait([*readers, *ending], timeout=_SIGNAL_LATENCY):
            if ready in ending:
                _ended(ending[ready])
                continue
            share = readers[ready]
            try:
                kind, _, payload = share.reader.recv()
            except EOFError:  # the process closed its end: it has said all it will
                share.reader.close()
                share.reader = None
                continue
            if kind == "progress":
                _progressed(running, share, payload, bar)
            elif kind == "done":
                share.results = payload
            else:
                share.error = payload
                share.failed = kind == "failed"


def _progressed(
    running: list[_Share], share: _Share, payload: tuple[int, int, int], bar: ProgressBar | None
) -> None:
    # One bar for the log: how far the slowest share is (each reads all of it).
    before = _slowest(running)
    _, share.position, share.head = payload
    reached = _slowest(running)
    if bar is not None and reached is not None:
        # (The first time, a resumed build's earlier events are not counted.)
        events = 0 if before is None else reached - before
        bar(Progress(events, reached, max(s.head for s in running)))


def _slowest(running: list[_Share]) -> int | None:
    """The lowest position the shares have reported; None until each has reported."""
    positions = [s.position for s in running]
    return None if None in positions else min(p for p in positions if p is not None)


def _ended(share: _Share) -> None:
    """``share``'s process ended, its pipe read to the end, without a last report (killed)."""
    share.process.join()
    names = ", ".join(p.name for p in share.projections)
    share.failed = True
    share.error = (
        f"the process rebuilding {names} ended (exit code {share.process.exitcode}) before "
        "it finished; what it committed stays: run the rebuild again to resume it"
    )


def _rebuild_share(
    index: int,
    settings: Settings,
    url: str,
    names: list[str],
    batch_size: int,
    keep_old: bool,
    reports: Any,
) -> None:
    """One process's share (the target of a spawned process): projections are sent by
    name, as their handlers may be closures, which do not pickle."""

    # Ctrl-C reaches the terminal's whole process group: the parent alone answers it, by
    # stopping this process (SIGTERM: what it committed stays).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _end_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        return  # the parent died before the line above: nobody to report to

    def report(step: Progress) -> None:
        reports.send(("progress", index, (step.events, step.position, step.head)))

    try:
        log = open_event_log(settings=settings)
        try:
            with collector_paused():
                results = rebuild_together(
                    log,
                    url,
                    [projections_module.by_name(name) for name in names],
                    batch_size=batch_size,
                    keep_old=keep_old,
                    progress=False,
                    on_progress=report,
                )
        finally:
            log.close()
    except RebuildError as refused:
        reports.send(("refused", index, str(refused)))
    except Exception as error:
        reports.send(("failed", index, first_line(error)))
        raise
    else:
        reports.send(("done", index, results))
