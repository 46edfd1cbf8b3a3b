"""Rebuilds spread over several processes: ``daybook projections rebuild --jobs N``.

A bulk rebuild is bound by one interpreter: its main thread runs every handler of every
projection for every event, and Python runs one thread at a time. Projections are
independent (each version has its own tables, tracking row and writer lock), so N processes,
each rebuilding its share of them in one pass over the log (``rebuild_together``), use N
cores; each reads the log, and decodes only the events its share handles.

Shares are dealt by weight, heaviest first, each to the lightest share so far: a projection's
weight is the number of log events of the types it handles (one grouped count on PostgreSQL).

Each process is started fresh (``spawn``: nothing of this one's connections or threads is
inherited), reports its batches and its end through a queue, and builds exactly as a
rebuild of its share alone would: a process that dies (killed, out of memory) leaves its
versions where their last batch committed, and running the command again resumes them.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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

#: Seconds between looks at the processes when none reports.
_POLL = 0.5


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
    heaviest first, each to the lightest share so far (the first of equals)."""
    dealt: list[list[Projection]] = [[] for _ in range(max(1, jobs))]
    totals = [0] * len(dealt)
    for projection in sorted(projections, key=lambda p: -weight.get(p.name, 0)):
        lightest = totals.index(min(totals))
        dealt[lightest].append(projection)
        totals[lightest] += weight.get(projection.name, 0)
    return [share for share in dealt if share]


class RebuildJobFailed(RebuildError):
    """A process of a rebuild spread over several ended without finishing its share."""


@dataclass
class _Share:
    projections: list[Projection]
    process: Any
    position: int | None = None
    head: int = 0
    results: list[RebuildResult] | None = None
    error: str | None = None
    #: Looks at an empty queue since its process was found ended.
    silent_looks: int = 0


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
    processes read; ``log`` is this process's view of it (for the weights).

    Raises ``RebuildError`` if a share was refused (nothing of it built), or
    ``RebuildJobFailed`` if a process ended without finishing (what it committed stays, and
    a new run resumes it); the shares of the other processes are finished either way."""
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
    reports: Any = context.Queue()
    running = [
        _Share(
            share,
            context.Process(
                target=_rebuild_share,
                args=(index, settings, url, [p.name for p in share], batch_size, keep_old, reports),
                name=f"daybook-rebuild-{index}",
            ),
        )
        for index, share in enumerate(dealt)
    ]
    bar = ProgressBar(f"{len(projections)} projections in {len(dealt)} processes", 0, stream)
    try:
        with _terminated_as_interrupted():
            for share in running:
                share.process.start()
            _follow(running, reports, bar if progress else None)
    except BaseException:
        for share in running:  # a Ctrl-C reached them too; anything else: stop them
            if share.process.is_alive():
                share.process.terminate()
        raise
    finally:
        for share in running:
            share.process.join()
        reports.close()
        if progress:
            bar.close()
    errors = [share.error for share in running if share.error is not None]
    if errors:
        failed = RebuildJobFailed if any(s.results is None for s in running) else RebuildError
        raise failed("; ".join(errors))
    return [result for share in running for result in share.results or []]


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


def _follow(running: list[_Share], reports: Any, bar: ProgressBar | None) -> None:
    """Take the processes' reports until each has ended, drawing ``bar`` over them all."""
    while any(s.results is None and s.error is None for s in running):
        try:
            kind, index, payload = reports.get(timeout=_POLL)
        except queue.Empty:
            for share in running:
                _check_alive(share)
            continue
        share = running[index]
        if kind == "progress":
            # One bar for the log: how far the slowest share is (each reads all of it).
            before = _slowest(running)
            _, share.position, share.head = payload
            reached = _slowest(running)
            if bar is not None and reached is not None:
                # (The first time, a resumed build's earlier events are not counted.)
                events = 0 if before is None else reached - before
                bar(Progress(events, reached, max(s.head for s in running)))
        elif kind == "done":
            share.results = payload
        else:
            share.error = payload


def _slowest(running: list[_Share]) -> int | None:
    """The lowest position the shares have reported; None until each has reported."""
    positions = [s.position for s in running]
    return None if None in positions else min(p for p in positions if p is not None)


def _check_alive(share: _Share) -> None:
    """Mark ``share`` failed if its process ended without a word (killed). A process's
    reports are all in the queue's pipe before it exits, but one sent just before a look
    that found the queue empty is read only at the next: so only the second empty look after
    its end says it sent nothing."""
    if share.results is not None or share.error is not None or share.process.is_alive():
        return
    share.silent_looks += 1
    if share.silent_looks < 2:
        return
    names = ", ".join(p.name for p in share.projections)
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
        reports.put(("progress", index, (step.events, step.position, step.head)))

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
        reports.put(("error", index, str(refused)))
    except Exception as error:
        reports.put(("error", index, first_line(error)))
        raise
    else:
        reports.put(("done", index, results))
