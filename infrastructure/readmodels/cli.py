"""``daybook project``, ``daybook projections rebuild|status|resume`` and ``daybook reconcile``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from daybook import projections
from daybook.infrastructure.bootstrap import (
    continuous_reconciler,
    open_event_log,
    projection_runner,
)
from daybook.infrastructure.cli import (
    add_log_arguments,
    add_metrics_port_argument,
    add_readmodels_argument,
    add_startup_wait_argument,
    add_url_argument,
    checked_settings,
    command,
    metrics_served,
    seconds,
    settings_of,
    setup_logging,
    stopped_at_start,
    topic_name,
    when_usable,
    whole_number,
)
from daybook.infrastructure.collector import collector_paused
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.readmodels.catalog import (
    IllegalTransition,
    VersionCatalog,
    VersionState,
)
from daybook.infrastructure.readmodels.checkpoints import RUNNER, group_of
from daybook.infrastructure.readmodels.handover import HandoverRefused, handover
from daybook.infrastructure.readmodels.location import ReadModelLocation, open_store
from daybook.infrastructure.readmodels.rebuild import RebuildError, RebuildResult, serves
from daybook.infrastructure.readmodels.rebuild_jobs import rebuild_in_processes
from daybook.infrastructure.readmodels.reconcile import DRIFTS_LISTED, ReconcileError, reconcile
from daybook.infrastructure.readmodels.reconciler import (
    ReconcileRun,
    failed_run,
    record_run,
    run_of,
)
from daybook.infrastructure.readmodels.status import projection_status
from daybook.infrastructure.settings import (
    DEFAULT_PARTITIONS,
    MAX_GROUP,
    MAX_TOPIC,
    Settings,
    check_group,
)
from daybook.infrastructure.streaming.relay import read_cursor
from daybook.infrastructure.urls import scheme


def _common(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_readmodels_argument(parser)


_NAMES = [p.name for p in projections.ALL]
_PG = "postgresql://daybook@localhost/daybook"
_OWNERS = f"expected {RUNNER} or stream:GROUP"


def _projection_name(text: str) -> str:
    """An argparse type: a projection's name, or a one-line refusal naming the known ones."""
    if text not in _NAMES:
        msg = f"invalid choice: {text!r} (choose from {', '.join(map(repr, _NAMES))})"
        raise argparse.ArgumentTypeError(msg)
    return text


def _owner(text: str) -> str:
    """An argparse type: the owner a handover is to, ``runner`` or ``stream:GROUP`` with a
    group a worker can run as, or a one-line refusal. ``handover()`` checks the form again
    for Python callers; here a mistyped owner is a bad option (exit 2), not a refusal."""
    if text == RUNNER:
        return text
    group = group_of(text)
    if group is None:
        raise argparse.ArgumentTypeError(f"{_OWNERS}, got {text!r}")
    try:
        check_group(group)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{_OWNERS} ({error})") from None
    return text


def register(subparsers: Any) -> None:
    project = command(
        subparsers,
        "project",
        help="keep the read models up to date (the projection runner)",
        description=(
            "Follow the event log and apply every projection to its read-model tables in "
            "batches, recording positions in the same transactions. One runner writes each "
            "projection version; start more as standbys. Stops cleanly on SIGINT/SIGTERM."
        ),
        examples=[
            f"daybook project --url {_PG}",
            "daybook project --url sqlite:///ledger.db --readmodels-url sqlite:///views.db",
            f"daybook project --url {_PG} --batch-size 5000 --poll-interval 0.5",
            f"daybook project --url {_PG} --metrics-port 9464 --log-format json --log-level debug",
            f"daybook project --url {_PG} --startup-wait 60",
        ],
    )
    _common(project)
    project.add_argument(
        "--batch-size", type=whole_number(1), default=1000, help="events per transaction, at most"
    )
    project.add_argument(
        "--poll-interval",
        type=seconds,
        default=0.2,
        help="seconds between looks at the log when nothing wakes the runner",
    )
    add_metrics_port_argument(project)
    add_log_arguments(project)
    add_startup_wait_argument(project)
    project.set_defaults(handler=_run_project)

    group = command(
        subparsers,
        "projections",
        help="rebuild, inspect or resume projections",
        description="Rebuild a projection from the log, show every version's state, hand "
        "versions between the runner and stream groups, resume one stopped on an event it "
        "could not apply, or drop a retired version's kept tables.",
        examples=[
            "daybook projections status",
            "daybook projections rebuild account_balances  # once its version is bumped",
            "daybook projections resume account_balances",
            "daybook projections drop account_balances 1",
        ],
    )
    commands = group.add_subparsers(dest="projections_command", metavar="COMMAND")
    build = command(
        commands,
        "rebuild",
        help="build projections' current versions from the log, then switch reads to them",
        description=(
            "Build the code's version of each projection named from the whole log in bulk, "
            "while the current version keeps serving reads; reads switch atomically once the "
            "new version has caught up, and the old tables are dropped. Several projections "
            "are built in one pass over the log; --jobs spreads them over processes (one "
            "core each). Interrupted, it resumes."
        ),
        examples=[
            f"daybook projections rebuild account_balances --url {_PG}",
            f"daybook projections rebuild --all --jobs 2 --url {_PG}",
            "daybook projections rebuild daily_activity account_statement --batch-size 20000 "
            "--keep-old",
            "daybook projections rebuild account_statement --no-progress "
            "--readmodels-url sqlite:///views.db",
        ],
    )
    _common(build)
    build.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        # Not ``choices``: argparse checks an empty list against them too, and refuses it.
        type=_projection_name,
        help="projections: " + ", ".join(_NAMES),
    )
    build.add_argument(
        "--all",
        action="store_true",
        help="every projection whose code's version does not serve reads yet",
    )
    build.add_argument(
        "--jobs",
        type=whole_number(1),
        default=1,
        help="processes to spread the projections over (default 1: one pass, one process)",
    )
    build.add_argument(
        "--batch-size",
        type=whole_number(1),
        default=100_000,
        help="events per transaction, at most",
    )
    build.add_argument("--keep-old", action="store_true", help="keep the old version's tables")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(handler=_run_rebuild)

    status = command(
        commands,
        "status",
        help="version, position, lag and state of each",
        description=(
            "For every projection version: whether it serves reads, its state (live, "
            "rebuilding, stopped, retired), its log position, the head, its lag in events "
            "and seconds, its parked events, and its last reconcile run (position, ranges "
            "checked and differing, duration, drifted rows with their keys, repaired or not). "
            "Exits 1 when a serving version is stopped, has a runner or workers that cannot "
            "follow it, drifted without repair, or stands past the log's head (an event store "
            "restored from a backup older than the read models)."
        ),
        examples=[
            "daybook projections status",
            f"daybook projections status --url {_PG}",
            "daybook projections status --url sqlite:///ledger.db "
            "--readmodels-url sqlite:///views.db",
        ],
    )
    _common(status)
    status.set_defaults(handler=_run_status)

    hand = command(
        commands,
        "handover",
        help="hand projections to the runner or to a stream group, converting the checkpoint",
        description=(
            "Each projection version has one owner: the in-process runner (`--to runner`) or "
            "the workers of one consumer group (`--to stream:GROUP`). The handover converts "
            "the checkpoint (a log position, a partition vector) in one transaction, applying "
            "from the log what the new one needs: no event is applied twice or skipped. "
            "Writers of the old owner let go at their next batch."
        ),
        examples=[
            f"daybook projections handover account_balances --to stream:daybook --url {_PG}",
            f"daybook projections handover daily_activity inventory_levels --to runner --url {_PG}",
            f"daybook projections handover sagas --to stream:views --topic daybook.events "
            f"--partitions 8 --url {_PG} --readmodels-url postgresql://views@rm/views",
        ],
    )
    _common(hand)
    hand.add_argument(
        "names", nargs="+", metavar="NAME", choices=_NAMES, help="projections: " + ", ".join(_NAMES)
    )
    hand.add_argument(
        "--to",
        required=True,
        type=_owner,
        help=f"the new owner: runner, or stream:GROUP (GROUP 1-{MAX_GROUP} of a-z A-Z 0-9 . _ -)",
    )
    hand.add_argument(
        "--topic",
        type=topic_name,
        help=f"the events topic, 1-{MAX_TOPIC} of a-z A-Z 0-9 . _ - (default: $DAYBOOK_TOPIC)",
    )
    hand.add_argument(
        "--partitions",
        type=whole_number(1),
        help=(
            "its partitions (default: the count the relay publishes the topic with, else "
            "the one the versions the group owns record, which any other value is refused "
            "against; required for a group that owns "
            "none but has progress rows; for a group with nothing recorded yet, "
            f"$DAYBOOK_PARTITIONS or {DEFAULT_PARTITIONS})"
        ),
    )
    hand.set_defaults(handler=_run_handover)

    drop = command(
        commands,
        "drop",
        help="drop the tables of a retired version (kept by rebuild --keep-old)",
        description=(
            "Drop the tables of a projection version that no longer serves reads (retired): "
            "those a rebuild kept with --keep-old, or versions retired by daybook before "
            "switches marked their tables to drop. Nothing else ever drops them. Any other "
            "version is refused: it serves reads, is being built, or may be resumed. With "
            "--abandon, a version being built or stopped that does not serve reads is retired "
            "first (a rebuild given up on, the code gone back to the version serving): its "
            "version number is used up, and a new attempt takes a higher one. A drop waits at "
            "most --lock-wait seconds for transactions still reading the tables."
        ),
        examples=[
            "daybook projections status  # which versions are retired",
            f"daybook projections drop account_balances 1 --url {_PG}",
            "daybook projections drop daily_activity 3 --readmodels-url sqlite:///views.db",
            "daybook projections drop account_statement 2 --lock-wait 60",
            "daybook projections drop account_balances 2 --abandon  # a rebuild given up on",
        ],
    )
    _common(drop)
    drop.add_argument("name", choices=_NAMES, help="the projection: " + ", ".join(_NAMES))
    drop.add_argument("version", type=whole_number(1), help="the retired version")
    drop.add_argument(
        "--lock-wait",
        type=seconds,
        default=10.0,
        help="seconds to wait for readers of the tables before giving up (default 10)",
    )
    drop.add_argument(
        "--abandon",
        action="store_true",
        help="retire a version being built or stopped that does not serve reads, then drop it",
    )
    drop.set_defaults(handler=_run_drop)

    resume = command(
        commands,
        "resume",
        help="retry a projection stopped on a dead letter",
        description=(
            "Move a projection version stopped on an event it could not apply back to work: "
            "a running `daybook project` retries its parked events (fix the cause first)."
        ),
        examples=[
            "daybook projections resume account_balances",
            f"daybook projections resume daily_activity --url {_PG}",
            "daybook projections resume inventory_levels --readmodels-url sqlite:///views.db",
        ],
    )
    _common(resume)
    resume.add_argument("name", choices=_NAMES, help="the projection: " + ", ".join(_NAMES))
    resume.set_defaults(handler=_run_resume)
    group.set_defaults(handler=lambda args: _help(group))

    check = command(
        subparsers,
        "reconcile",
        help="compare read models with a replay of the log; exit 1 on drift",
        description=(
            "Recompute each read model from the log and compare it with the stored tables: "
            "checksums over key ranges first, then rows. Prints the first "
            f"{DRIFTS_LISTED:,} missing, extra or different rows of each projection and counts "
            "the rest; --repair rewrites every drifted row, listed or not, and records each "
            "change in daybook_reconcile_log. Each run is recorded in daybook_reconcile_runs "
            "(projections status and the dashboard show the last). A projection named with "
            "no version to check (never built, or retired, also by a rebuild during the run) "
            "exits 1; a full pass skips those and says so. A projection whose log cannot be "
            "folded (an event its definition refuses) is refused with reconcile_failed and "
            "recorded as a failed run; a full pass goes on with the others, names it at the "
            "end and exits 1."
        ),
        examples=[
            "daybook reconcile",
            f"daybook reconcile account_balances --url {_PG}",
            "daybook reconcile --repair --readmodels-url sqlite:///views.db",
            f"daybook reconcile --continuous --every-events 50000 --every-seconds 300 --url {_PG}",
            f"daybook reconcile --continuous --repair --log-format json --metrics-port 9465 "
            f"--log-level warning --url {_PG}",
            f"daybook reconcile --continuous --startup-wait 60 --url {_PG}",
        ],
    )
    _common(check)
    check.add_argument(
        "name", nargs="?", choices=_NAMES, help="one projection (default: every one)"
    )
    check.add_argument("--repair", action="store_true", help="rewrite drifted rows")
    check.add_argument(
        "--continuous",
        action="store_true",
        help="keep reconciling as a service, recording each run (status shows the last)",
    )
    check.add_argument(
        "--every-events",
        type=whole_number(1),
        help="with --continuous: reconcile after this many new events (default 100000)",
    )
    check.add_argument(
        "--every-seconds",
        type=seconds,
        help="with --continuous: and at least this often (default 600)",
    )
    add_log_arguments(check)
    add_metrics_port_argument(check)
    add_startup_wait_argument(check, "with --continuous: ")
    check.set_defaults(handler=_run_reconcile)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


#: Why these commands cannot work on memory://.
_WHY = "memory:// lives inside one process, and this command would see an empty ledger of its own"


@contextmanager
def _readmodels(args: argparse.Namespace) -> Iterator[str]:
    """The read-model URL for this command (a scratch database, removed when the command
    ends, for a memory:// event store)."""
    settings = settings_of(args)
    with ReadModelLocation(settings.url, settings.readmodels_url) as location:
        yield location.url


def _run_project(args: argparse.Namespace) -> int:
    setup_logging(args)
    # Metrics from the start: a probe sees the service (waiting, if it waits) at once.
    with metrics_served(args, "projection runner"):
        settings = when_usable(
            args, lambda: checked_settings(args, why=_WHY, existing=False, readmodels=True)
        )
        with stopped_at_start():
            runner = projection_runner(
                settings, batch_size=args.batch_size, poll_interval=args.poll_interval
            )

        def on_signal(signum: int, frame: Any) -> None:
            logging.getLogger("daybook.project").info(
                "daybook project: signal %d, stopping", signum
            )
            runner.request_stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            health = runner.run_forever()
        finally:
            runner.stop()
    if health.state is ServiceState.FAILED:
        print(f"daybook project: stopped: {health.error}", file=sys.stderr)
        return 1
    return 0


def _run_rebuild(args: argparse.Namespace) -> int:
    if bool(args.names) == bool(args.all):
        print(
            "daybook: name the projections to rebuild, or give --all (not both); known: "
            + ", ".join(_NAMES),
            file=sys.stderr,
        )
        return 2
    settings = checked_settings(args, why=_WHY, readmodels=True, new_readmodels=True)
    log = open_event_log(settings=settings)
    try:
        with _readmodels(args) as url, collector_paused():
            chosen = _named(args.names) if args.names else _not_serving(url)
            if not chosen:
                print("every projection's version serves reads already: nothing to rebuild")
                return 0
            jobs = min(args.jobs, len(chosen))
            started = time.monotonic()
            results = rebuild_in_processes(
                settings,
                url,
                chosen,
                jobs=jobs,
                log=log,
                batch_size=args.batch_size,
                keep_old=args.keep_old,
                progress=not args.no_progress,
            )
    except RebuildError as error:
        for result in error.results:  # built all the same: their reads switched
            _say_built(result)
        print(f"daybook: {_coded(error)}{error}", file=sys.stderr)
        return 1
    finally:
        log.close()
    seconds = time.monotonic() - started
    for result in results:
        _say_built(result)
    if len(results) > 1:
        events = max(result.position - result.resumed_from for result in results)
        print(
            f"{len(results)} projections built in {seconds:.1f}s, {jobs} process"
            f"{'es' if jobs > 1 else ''}: {events / max(seconds, 1e-9):,.0f} log events/s"
        )
    return 0


def _named(names: list[str]) -> list[projections.Projection]:
    return [projections.by_name(name) for name in dict.fromkeys(names)]


def _not_serving(url: str) -> list[projections.Projection]:
    """``--all``: the projections whose code's version does not serve reads (each one that
    does is named on stderr, and left alone)."""
    chosen = []
    for projection, serving in zip(projections.ALL, serves(url, projections.ALL), strict=True):
        if serving:
            print(
                f"{projection.name} version {projection.version} serves reads already; "
                "left as it is",
                file=sys.stderr,
            )
        else:
            chosen.append(projection)
    return chosen


def _say_built(result: RebuildResult) -> None:
    switched = (
        f"; reads switched from version {result.previous_version}"
        if result.previous_version is not None
        else ""
    )
    if result.by_another:
        print(
            f"{result.name} version {result.version} built to position {result.position} by "
            f"another process, after a wait of {result.seconds:.1f}s{switched}"
        )
        return
    print(
        f"{result.name} version {result.version} built to position {result.position}: "
        f"{result.events:,} events in {result.seconds:.1f}s "
        f"({result.events_per_second:,.0f} events/s){switched}"
    )


def _run_status(args: argparse.Namespace) -> int:
    log = open_event_log(settings=checked_settings(args, why=_WHY, readmodels=True))
    try:
        with _readmodels(args) as url:
            rows = projection_status(log, url)
    finally:
        log.close()
    print(
        f"{'projection':<20} {'ver':>3} {'serving':<7} {'state':<10} {'owner':<16} "
        f"{'position':>10} {'head':>10} {'lag':>8} {'lag s':>8} {'dead':>4}"
    )
    for row in rows:
        position = f"{row.position}{'+' if row.includes_later else ''}"
        print(
            f"{row.name:<20} {row.version:>3} {'yes' if row.active else '':<7} "
            f"{row.state.value:<10} {row.owner:<16} "
            f"{position:>10} {row.head:>10} {row.lag_events:>8} {row.lag_seconds:>8.1f} "
            f"{row.dead_letters:>4}"
        )
        if row.error:
            print(f"    {row.error}")
        if row.note:
            print(f"    {row.note}")
        run = row.reconciled
        if run is not None:
            if run.error:
                verdict = f"failed: {run.error}"
            elif run.drifted:
                repaired = "repaired" if run.repaired else "not repaired"
                verdict = f"{run.drifted} drifted rows, {repaired}"
            else:
                verdict = "clean"
            print(
                f"    reconciled at position {run.position} ({run.finished_at}, "
                f"{run.ranges_checked} ranges checked, {run.ranges_differing} differing, "
                f"in {run.seconds:.2f}s): {verdict}"
            )
            for drift in run.drifts[:5]:
                print(f"      {drift}")
    if any(row.includes_later for row in rows):
        print("(+: some events after that position are applied too, by partitions ahead)")
    stopped = any(r.state is VersionState.STOPPED and r.active for r in rows)
    unfollowed = any(r.note and r.active for r in rows)
    drifted = any(
        r.active and r.reconciled and r.reconciled.drifted and not r.reconciled.repaired
        for r in rows
    )
    return 1 if stopped or unfollowed or drifted else 0


def _run_handover(args: argparse.Namespace) -> int:
    settings = checked_settings(args, why=_WHY, readmodels=True)
    chosen = [projections.by_name(name) for name in dict.fromkeys(args.names)]
    log = open_event_log(settings=settings)
    try:
        with _readmodels(args) as url:
            handed = handover(
                log, url, chosen, args.to, topic=settings.topic, partitions=args.partitions,
                default_partitions=settings.partitions, known=projections.ALL,
                published=_published_partitions(settings),
                published_of=lambda topic: _published_partitions(settings, topic),
            )  # fmt: skip
    except HandoverRefused as refused:
        print(f"daybook: {_coded(refused)}{refused}", file=sys.stderr)
        return 1
    finally:
        log.close()
    for item in handed:
        if item.previous_owner == item.owner:
            print(f"{item.name} v{item.version}: already owned by {item.owner}")
            continue
        print(
            f"{item.name} v{item.version}: handed from {item.previous_owner} to {item.owner} "
            f"at position {item.position} ({item.applied} events applied from the log)"
        )
    return 0


def _published_partitions(settings: Settings, topic: str | None = None) -> int | None:
    """The partition count the relay publishes the topic (``topic``, else the settings')
    with, if a relay has (its cursor is in the event store: PostgreSQL only)."""
    if scheme(settings.url) != "postgresql":
        return None
    cursor = read_cursor(settings.url, topic or settings.topic)
    return None if cursor is None else cursor.partitions


def _coded(refused: Exception) -> str:
    """``refused (CODE): `` for a refusal with a stable code (``failed (CODE): `` for an
    error whose ``verdict`` says so), else nothing."""
    code = getattr(refused, "code", None)
    return f"{getattr(refused, 'verdict', 'refused')} ({code}): " if code else ""


def _run_resume(args: argparse.Namespace) -> int:
    projection = projections.by_name(args.name)
    checked_settings(args, why=_WHY, readmodels=True)
    with _readmodels(args) as url:
        store = open_store(url)
        try:
            catalog = VersionCatalog(store)
            catalog.ensure()
            catalog.resume(projection.name, projection.version)
        except (IllegalTransition, LookupError) as refused:
            print(
                f"daybook: {_coded(refused)}{args.name} v{projection.version}: {refused}",
                file=sys.stderr,
            )
            return 1
        finally:
            store.close()
    print(f"{args.name}: resumed; a running `daybook project` retries its parked events")
    return 0


def _run_drop(args: argparse.Namespace) -> int:
    checked_settings(args, why=_WHY, readmodels=True)
    label = f"{args.name} v{args.version}"
    with _readmodels(args) as url:
        store = open_store(url)
        try:
            catalog = VersionCatalog(store)
            catalog.ensure()
            if args.abandon:
                tables = catalog.abandon(args.name, args.version)
            else:
                tables = catalog.mark_to_drop(args.name, args.version)
            if tables and not catalog.drop_retired(args.name, lock_wait=args.lock_wait):
                print(
                    f"daybook: {label}: its tables are still being read (a long report, a "
                    "reconcile); they are marked to drop, and a running `daybook project` or "
                    "stream worker drops them once free; or run this again",
                    file=sys.stderr,
                )
                return 1
        except (IllegalTransition, LookupError) as refused:
            print(f"daybook: {_coded(refused)}{label}: {refused}", file=sys.stderr)
            return 1
        finally:
            store.close()
    print(f"{label}: dropped {', '.join(tables)}" if tables else f"{label}: no tables left")
    return 0


def _run_continuous(args: argparse.Namespace, chosen: list[projections.Projection]) -> int:
    setup_logging(args)
    # The pacing given, if any; the reconciler's own defaults otherwise.
    paced = {"every_events": args.every_events, "every_seconds": args.every_seconds}
    # Metrics from the start: a probe sees the service (waiting, if it waits) at once.
    with metrics_served(args, "continuous reconciler"):
        settings = when_usable(
            args, lambda: checked_settings(args, why=_WHY, existing=False, readmodels=True)
        )
        with stopped_at_start():
            service = continuous_reconciler(
                settings,
                projections=chosen,
                repair=args.repair,
                **{name: value for name, value in paced.items() if value is not None},
            )

        def on_signal(signum: int, frame: Any) -> None:
            logging.getLogger("daybook.reconcile").info(
                "daybook reconcile: signal %d, stopping", signum
            )
            service.service.stopping.set()
            service.log.interrupt()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            health = service.run_forever()
        finally:
            service.close()
    if health.state is ServiceState.FAILED:
        print(f"daybook reconcile: stopped: {health.error}", file=sys.stderr)
        return 1
    return 0


def _record(url: str, run: ReconcileRun) -> None:
    """Record a run as the continuous reconciler does (status and the dashboard show it)."""
    store = open_store(url)
    try:
        record_run(store, run)
    finally:
        store.close()


class _Said:
    """How far a one-pass reconcile's fold of the log is, on stderr every few seconds (a
    fold of a long log takes minutes): nothing for a short one."""

    EVERY = 5.0
    clock = staticmethod(time.monotonic)

    def __init__(self, projection: projections.Projection) -> None:
        self._name = f"{projection.name} v{projection.version}"
        self._next = self.clock() + self.EVERY

    def __call__(self, folded: int, end: int) -> None:
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.EVERY
        share = f" ({100 * folded // end}%)" if end > 0 else ""
        print(
            f"{self._name}: folded the log to position {folded:,} of {end:,}{share}",
            file=sys.stderr,
            flush=True,
        )


def _run_reconcile(args: argparse.Namespace) -> int:
    chosen = [projections.by_name(args.name)] if args.name else list(projections.ALL)
    if args.continuous:
        return _run_continuous(args, chosen)
    if args.every_events is not None or args.every_seconds is not None:
        print(
            "daybook reconcile: --every-events and --every-seconds pace --continuous; "
            "add --continuous, or leave them out for one pass",
            file=sys.stderr,
        )
        return 2
    if args.startup_wait is not None:
        print(
            "daybook reconcile: --startup-wait is for --continuous (one pass refuses a "
            "database that does not answer at once); add --continuous, or leave it out",
            file=sys.stderr,
        )
        return 2
    log = open_event_log(settings=checked_settings(args, why=_WHY, readmodels=True))
    drifted = False
    failed: list[str] = []
    try:
        for projection in chosen:
            try:
                with _readmodels(args) as url:
                    try:
                        report = reconcile(
                            log, url, projection, repair=args.repair, progress=_Said(projection)
                        )
                    except ReconcileError as error:
                        # Recorded as the continuous reconciler records it (status shows it).
                        _record(url, failed_run(projection, error))
                        raise
                    _record(url, run_of(report))
            except LookupError as error:
                if args.name:  # the one projection asked for was not checked
                    print(f"daybook: {_coded(error)}{error}", file=sys.stderr)
                    return 1
                print(f"{projection.name}: skipped ({error})")
                continue
            except ReconcileError as error:
                # A refusal, not a bug: one line, and a full pass goes on with the others.
                print(f"daybook: refused ({error.code}): {error}", file=sys.stderr)
                failed.append(projection.name)
                continue
            verdict = "clean" if report.clean else f"{report.drift_count} drifted rows"
            if report.repaired:
                verdict += ", repaired"
            elif args.repair and not report.clean:
                verdict += (
                    ", not repaired (handed over, repaired by another, or still drifting"
                    " after 10 rounds; run it again)"
                )
            owner = "" if report.vector is None else f" (vector {list(report.vector)})"
            print(
                f"{report.name} v{report.version} owned by {report.owner} at position "
                f"{report.position}{owner}: {verdict} ({report.rows_expected} rows, "
                f"{report.ranges_differing}/{report.ranges_checked} key ranges differ, "
                f"{report.seconds:.1f}s)"
            )
            for drift in report.drifts:
                print(f"  {drift.describe()}")
            if report.unlisted:
                print(f"  ... and {report.unlisted} more")
            drifted = drifted or not (report.clean or report.repaired)
    finally:
        log.close()
    if failed and not args.name:
        print(
            f"daybook: not reconciled (the log could not be folded): {', '.join(failed)}",
            file=sys.stderr,
        )
    return 1 if drifted or failed else 0
