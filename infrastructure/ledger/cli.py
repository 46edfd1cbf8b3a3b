"""``daybook requests purge``: delete expired request records now, or show what would go."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from daybook.infrastructure.bootstrap import ledger_service, read_only_recorder
from daybook.infrastructure.cli import (
    add_url_argument,
    checked_settings,
    command,
    whole_number,
)
from daybook.infrastructure.eventstore import UPGRADE_RETENTION
from daybook.infrastructure.ledger.requests import PurgeReport, RequestTable, utc
from daybook.infrastructure.ledger.retention import ClockCheck

#: Seconds between two progress lines of a purge (on stderr).
PROGRESS_EVERY = 5.0


def register(subparsers: Any) -> None:
    group = command(
        subparsers,
        "requests",
        help="idempotency records: delete the expired ones",
        description=(
            "Every command's request id is recorded so that a retry is replayed instead of "
            "applied twice. A caller-chosen id is kept for the retention window "
            "($DAYBOOK_REQUEST_RETENTION, default 3 days), a generated one for an hour; a "
            "running ledger deletes expired records every minute. These commands do it now."
        ),
        examples=[
            "daybook requests purge --dry-run",
            "daybook requests purge --url sqlite:///x.db",
        ],
    )
    commands = group.add_subparsers(dest="requests_command", metavar="COMMAND")
    purge = command(
        commands,
        "purge",
        help="delete expired request records (--dry-run: only show what would go)",
        description=(
            "Delete request records whose retention window has passed, in batches of "
            "--batch-size rows, each its own short transaction, so writers are never kept "
            "waiting; a long purge says how far it got every few seconds (on stderr). "
            "--dry-run only reads: it changes nothing in the database, not even a request "
            "table written before records expired (daybook 0.2 and earlier), which a real "
            "purge, like any ledger that opens the database, first gives the expiry. On "
            "PostgreSQL a record goes only once expired by both this host's clock and the "
            "database server's (a host whose clock is ahead deletes nothing early)."
        ),
        examples=[
            "daybook requests purge --dry-run",
            "daybook requests purge --url postgresql://app@db/ledger --batch-size 5000",
        ],
    )
    add_url_argument(purge)
    purge.add_argument(
        "--dry-run",
        action="store_true",
        help="count what would be deleted; change nothing in the database",
    )
    purge.add_argument(
        "--batch-size",
        type=whole_number(1),
        default=1_000,
        help="rows deleted per transaction (default 1000)",
    )
    purge.set_defaults(handler=_run_purge)
    group.set_defaults(handler=lambda args: _help(group))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def describe(report: PurgeReport, deleted: int | None = None) -> str:
    """What a purge would do (``deleted`` None) or did, in a sentence."""
    if not report.expired:
        return f"nothing to delete: none of the {report.kept:,} request records has expired"
    span = ""
    if report.oldest is not None and report.newest is not None:
        span = f", expired between {utc(report.oldest)} and {utc(report.newest)}"
    what = (
        f"{report.caller:,} of caller-chosen ids past their retention window, "
        f"{report.generated:,} batch token{'' if report.generated == 1 else 's'} of generated "
        f"ids no longer needed for the ledger's own retries{span}"
    )
    if deleted is not None and deleted > report.expired:
        # Records go on expiring while a long purge runs, and it deletes those too.
        return (
            f"deleted {deleted:,} expired request records: the {report.expired:,} counted "
            f"as it began ({what}), and {deleted - report.expired:,} that expired while it "
            f"ran; {report.kept:,} were kept when it began"
        )
    verb = "would delete" if deleted is None else f"deleted {deleted:,} of"
    return f"{verb} {report.expired:,} expired request records ({what}); {report.kept:,} kept"


def _unmigrated(table: RequestTable) -> str:
    """What a dry run says of a request table written before records expired."""
    count = table.unmigrated
    records = f"the {count:,} request record{'s' if count != 1 else ''}"
    return (
        f"nothing to delete: {records} {'predate' if count != 1 else 'predates'} record "
        "expiry (the table was written by daybook 0.2 or earlier); a real purge (or starting "
        "daybook) first migrates the table, giving every record one retention window "
        f"({UPGRADE_RETENTION / 3600:g} hours) from then, so it would delete none of them "
        "now; this dry run changed nothing"
    )


def _run_purge(args: argparse.Namespace) -> int:
    settings = checked_settings(args)
    # Look first, on connections that cannot write: a dry run goes no further, and a
    # database no ledger has written to is left as it is.
    with read_only_recorder(settings) as recorder:
        table = recorder.request_table()
        report = None
        if args.dry_run and table.exists and not table.predates_expiry:
            # The ledger's clock, held to the database's as a real purge is (and said to be
            # off it, if it is: a real purge's service says so itself).
            report = recorder.expired_requests(ClockCheck().purge_time(recorder, time.time()))
    if not table.exists:
        print(
            "nothing to delete: there are no request records (the database has no "
            "daybook_requests table; no ledger has written to it)"
        )
        return 0
    if args.dry_run:
        print(_unmigrated(table) if report is None else describe(report))
        return 0
    # The ledger service migrates a table from before expiry as it opens. No committer:
    # nothing is written but deletions.
    service = ledger_service(settings.model_copy(update={"group_commit": False}), purge=False)
    try:
        if table.predates_expiry:
            print(
                f"migrated the request table from before record expiry: its "
                f"{table.unmigrated:,} records are kept for one retention window "
                f"({UPGRADE_RETENTION / 3600:g} hours) from now"
            )
        purge = service.request_purge
        purge.batch = args.batch_size
        report = purge.report()
        return _purge(purge, report)
    finally:
        service.close()


def _purge(purge: Any, report: PurgeReport) -> int:
    """Delete what ``report`` counted, saying how far it got every ``PROGRESS_EVERY``
    seconds, then what was deleted."""
    if not report.expired:
        print(describe(report, 0))
        return 0
    started = last = time.monotonic()
    deleted = 0

    def progress(count: int) -> None:
        nonlocal last, deleted
        deleted = count
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY:
            last = now
            of = f" of {report.expired:,}" if count <= report.expired else ""
            print(
                f"daybook requests purge: deleted {count:,}{of} so far ({now - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    try:
        deleted = purge.purge(progress=progress)
    except KeyboardInterrupt:
        print(
            f"daybook requests purge: interrupted after deleting {deleted:,} of "
            f"{report.expired:,} expired request records (each batch is committed); run it "
            "again to delete the rest",
            file=sys.stderr,
        )
        return 130
    print(f"{describe(report, deleted)}; took {time.monotonic() - started:.1f} s")
    return 0
