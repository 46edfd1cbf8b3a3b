"""``daybook requests purge``: delete expired request records now, or show what would go."""

from __future__ import annotations

import argparse
from typing import Any

from daybook.infrastructure.bootstrap import ledger_service
from daybook.infrastructure.cli import (
    add_url_argument,
    checked_settings,
    command,
    whole_number,
)
from daybook.infrastructure.ledger.requests import PurgeReport, utc


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
            "waiting."
        ),
        examples=[
            "daybook requests purge --dry-run",
            "daybook requests purge --url postgresql://app@db/ledger --batch-size 5000",
        ],
    )
    add_url_argument(purge)
    purge.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
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
    verb = "would delete" if deleted is None else f"deleted {deleted:,} of"
    return (
        f"{verb} {report.expired:,} expired request records ({report.caller:,} of "
        f"caller-chosen ids past their retention window, {report.generated:,} batch "
        f"token{'' if report.generated == 1 else 's'} of generated ids no longer needed "
        f"for the ledger's own retries{span}); {report.kept:,} kept"
    )


def _run_purge(args: argparse.Namespace) -> int:
    service = ledger_service(checked_settings(args), purge=False)
    try:
        purge = service.request_purge
        purge.batch = args.batch_size
        report = purge.report()
        if args.dry_run:
            print(describe(report))
            return 0
        print(describe(report, purge.purge()))
        return 0
    finally:
        service.close()
