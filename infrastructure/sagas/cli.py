"""``daybook sagas run|list|show|retry|cancel|reconcile``."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, cast
from uuid import UUID

from daybook.domain.events import LedgerAggregate
from daybook.domain.sagas import Saga
from daybook.infrastructure import preflight
from daybook.infrastructure.bootstrap import (
    expiry_sweeper,
    open_ledger,
    payment_gateway,
    run_projections,
    saga_processor,
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
    setup_logging,
    uuid_argument,
    when_usable,
    whole_number,
)
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.readmodels.queries import Answer, ReadModels, StaleRead
from daybook.infrastructure.sagas.reconcile import PAGE, reconcile_payments
from daybook.infrastructure.settings import Settings
from daybook.infrastructure.urls import redacted
from daybook.projections import OPEN_HOLDS_PROJECTION, SAGA_LIST
from daybook.projections.model import Row
from daybook.projections.sagas import SAGAS

#: A saga id, for the examples in --help.
_SAGA = "2f1c4b9e-7d3a-4c55-9e0b-6a1d2c3e4f50"

STATES = ("running", "compensating", "completed", "compensated", "needs_attention")


def _common(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_readmodels_argument(parser)


def _gateway(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gateway",
        help="payment gateway URL, http://host:port (default: $DAYBOOK_GATEWAY_URL)",
    )


_SAGA_ID = uuid_argument("saga id")


def _decider(text: str) -> str:
    """An argparse type: who decides, as given. Only an absent ``--by`` falls back to the
    system user: an empty one is most likely ``--by "$OPERATOR"`` with the variable unset,
    and the decision (a cancel cannot be taken back) would be recorded as someone else's."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"must name who decides (leave --by out for the system user), got {text!r}"
        )
    return text


def _decision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "saga_id", type=_SAGA_ID, help="the saga's id (as `daybook sagas list` shows)"
    )
    parser.add_argument(
        "--by",
        type=_decider,
        default=None,
        help="who decides, not blank (default: the system user; `uid N` for a UID with no name)",
    )
    parser.add_argument("--reason", required=True, help="why (recorded with the decision)")


def register(subparsers: Any) -> None:
    group = command(
        subparsers,
        "sagas",
        help="run, inspect, retry or cancel sagas",
        description=(
            "Sagas carry an operation that crosses a boundary (an order: reserve stock, hold "
            "funds, charge the payment gateway, capture) to an end: completed, compensated, or "
            "needs_attention when a compensation keeps failing."
        ),
        examples=["daybook sagas list --state needs_attention", "daybook sagas run --help"],
    )
    commands = group.add_subparsers(dest="sagas_command", metavar="COMMAND")
    group.set_defaults(handler=lambda args: _help(group))

    run = command(
        commands,
        "run",
        help="drive sagas and record expiries (the saga processor and the expiry sweeper)",
        description=(
            "Run the saga processor (local steps through the ledger, remote steps through "
            "the payment gateway, deadlines, compensations) and the sweeper that records "
            "expired holds and reservations, with the read models they poll kept up to "
            "date. Stops cleanly on SIGINT/SIGTERM; exits 1 when one of its parts (those, "
            "or the ledger's committer or request purge) has failed."
        ),
        examples=[
            "daybook sagas run --url postgresql://app@db/ledger --gateway http://pay:8080",
            "daybook sagas run --readmodels-url postgresql://app@rm/read --workers 16",
            "daybook sagas run --log-format json --metrics-port 9466",
            "daybook sagas run --log-level debug   # and a line per call to the gateway",
            "daybook sagas run --gateway http://pay:8080 --startup-wait 120",
        ],
    )
    _common(run)
    _gateway(run)
    add_log_arguments(run)
    add_metrics_port_argument(run)
    add_startup_wait_argument(run)
    run.add_argument(
        "--workers", type=whole_number(1), default=8, help="sagas driven at once (default: 8)"
    )
    run.set_defaults(handler=_run)

    listing = command(
        commands,
        "list",
        help="sagas by state, from the sagas read model",
        description="Sagas from the sagas read model, the most recently changed first.",
        examples=[
            "daybook sagas list --state needs_attention --limit 20",
            "daybook sagas list --url postgresql://app@db/ledger --readmodels-url sqlite:///rm.db",
        ],
    )
    _common(listing)
    listing.add_argument(
        "--state", choices=STATES, help="only sagas in this state (default: every state)"
    )
    listing.add_argument(
        "--limit", type=whole_number(1), default=50, help="at most this many (default: 50)"
    )
    listing.set_defaults(handler=_list)

    show = command(
        commands,
        "show",
        help="one saga: its state and event history",
        description="A saga's state and every event of its history, with the decisions made.",
        examples=[f"daybook sagas show {_SAGA} --url postgresql://app@db/ledger"],
    )
    add_url_argument(show)
    show.add_argument("saga_id", type=_SAGA_ID, help="the saga's id")
    show.set_defaults(handler=_show)

    retry = command(
        commands,
        "retry",
        help="try the compensations of a saga that needs attention again",
        description=(
            "Move a saga that needs attention back to compensating, so the processor tries its "
            "compensations again; who decided and why are recorded. If it needs attention "
            "because a step's work was resolved the other way (a hold captured, a reservation "
            "shipped), retry once you have dealt with that: the step is recorded as "
            "acknowledged by you, not undone, and the remaining compensations run."
        ),
        examples=[
            f'daybook sagas retry {_SAGA} --reason "gateway fixed" --by ops-alice',
            f'daybook sagas retry {_SAGA} --url postgresql://app@db/ledger --reason "fixed"',
        ],
    )
    add_url_argument(retry)
    _decision(retry)
    retry.set_defaults(handler=_retry)

    cancel = command(
        commands,
        "cancel",
        help="stop a running saga and compensate it",
        description=(
            "Cancel a running saga: its completed steps are compensated in reverse order; who "
            "decided and why are recorded."
        ),
        examples=[
            f'daybook sagas cancel {_SAGA} --reason "customer asked" --by ops-bob',
            f'daybook sagas cancel {_SAGA} --url postgresql://app@db/ledger --reason "duplicate"',
        ],
    )
    add_url_argument(cancel)
    _decision(cancel)
    cancel.set_defaults(handler=_cancel)

    check = command(
        commands,
        "reconcile",
        help="compare the gateway's charges with saga outcomes; refund or flag, and record",
        description=(
            "Compare the payment gateway's charges with the orders' outcomes: a charge of an "
            "order's saga (its key in daybook's form, SAGA_ID:charge) with no completed order "
            "is flagged (refunded with --repair); a completed order without a charge is "
            "flagged. Succeeded charges under other keys are other systems' and left alone "
            "(a charge in a state daybook does not know is flagged, whatever its key). Every "
            "decision is recorded. Exits 1 while findings remain."
        ),
        examples=[
            "daybook sagas reconcile --gateway http://pay:8080",
            "daybook sagas reconcile --repair --readmodels-url sqlite:///rm.db",
            "daybook sagas reconcile --url postgresql://app@db/ledger --gateway http://pay:8080",
        ],
    )
    _common(check)
    _gateway(check)
    check.add_argument(
        "--repair",
        action="store_true",
        help="refund daybook's charges no completed order explains",
    )
    check.set_defaults(handler=_reconcile)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _run(args: argparse.Namespace) -> int:
    setup_logging(args)

    def checked() -> Settings:
        settings = checked_settings(args, readmodels=True, existing=False)
        preflight.check_gateway(settings.gateway_url)
        return settings

    # Metrics from the start: a probe sees the service (waiting, if it waits) at once.
    with metrics_served(args, "daybook sagas"):
        settings = when_usable(args, checked)
        gateway = payment_gateway(settings)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        with (
            open_ledger(settings=settings) as ledger,
            run_projections(ledger, projections=[SAGA_LIST, OPEN_HOLDS_PROJECTION]) as runner,
        ):
            processor = saga_processor(ledger, runner.views, gateway, workers=args.workers)
            sweeper = expiry_sweeper(ledger, runner.views)
            processor.start()
            sweeper.start()
            print(
                f"daybook sagas: driving sagas on {redacted(settings.url)} "
                f"with {redacted(settings.gateway_url or '')}"
            )
            # The ledger's own services (its committer, its request purge) run here too.
            parts = (
                processor.health,
                sweeper.health,
                runner.health,
                ledger.health,
                ledger.request_purge.health,
            )
            try:
                while not stop.wait(1.0):
                    for health in (part() for part in parts):
                        if health.state is ServiceState.FAILED:
                            print(
                                f"daybook sagas: {health.name} failed: {health.error}",
                                file=sys.stderr,
                            )
                            return 1
            finally:
                processor.stop()
                sweeper.stop()
                gateway.close()
    return 0


def _saga_rows(
    views: ReadModels,
    where: str,
    params: list[Any],
    limit: int | None,
    order: str = "updated_at DESC",
) -> Answer[list[Row]] | None:
    """Rows of the sagas read model, or None (said on stderr) if it has not been built."""
    try:
        return views.rows(
            SAGA_LIST,
            SAGAS.name,
            where=where,
            params=params,
            order=order,
            limit=limit,
            timeout=0.0,
        )
    except StaleRead:
        print(
            "daybook: the sagas read model has not been built here; run `daybook project` "
            "or `daybook sagas run` (with the same --url / --readmodels-url)",
            file=sys.stderr,
        )
        return None


def _completed_orders(views: ReadModels) -> Iterator[UUID]:
    """Completed order sagas, in ascending order of their ids' text, a page at a time (by
    key, so memory holds one page however many there are)."""
    after = ""
    while True:
        where = "kind = 'order' AND state = 'completed' AND saga_id > %s"
        # StaleRead (the read model gone meanwhile) is the caller's to report: ending the
        # scan early would leave orders unchecked and report nothing.
        rows = views.rows(
            SAGA_LIST, SAGAS.name, where=where, params=[after], order="saga_id", limit=PAGE,
            timeout=0.0,
        ).value  # fmt: skip
        for row in rows:
            yield UUID(str(row["saga_id"]))
        if len(rows) < PAGE:
            return
        after = str(rows[-1]["saga_id"])


def _list(args: argparse.Namespace) -> int:
    settings = checked_settings(args, readmodels=True)
    with ReadModels(settings.readmodels) as views:
        where, params = ("state = %s", [args.state]) if args.state else ("", [])
        answer = _saga_rows(views, where, params, args.limit)
    if answer is None:  # not built yet: as `daybook balance` says it, exit 1
        return 1
    print(f"{'saga':36}  {'kind':6} {'state':15} {'step':10} {'tries':>5}  reference / last error")
    for row in answer.value:
        error = f"  ({row['last_error']})" if row["last_error"] else ""
        print(
            f"{row['saga_id']}  {row['kind']!s:6} {row['state']!s:15} {row['step']!s:10} "
            f"{row['attempts']!s:>5}  {row['reference']}{error}"
        )
    lag = "" if answer.lag_events is None else f", {answer.lag_events} events behind the log"
    # A stream group's version may hold some events after its position (see _behind).
    later = "+ (may include some later events)" if answer.includes_later else ""
    print(f"({len(answer.value)} shown; as of log position {answer.as_of_position}{later}{lag})")
    return 0


def _show(args: argparse.Namespace) -> int:
    with open_ledger(settings=checked_settings(args)) as ledger:
        view = ledger.read(Saga, args.saga_id).view()
        print(f"saga {view.saga_id} ({view.kind}): {view.state}, step {view.step}")
        if view.last_error:
            print(f"  last error: {view.last_error}")
        if view.deadline:
            print(f"  deadline: {view.deadline.isoformat()}")
        print("history:")
        for stored in ledger.service.events.get(args.saga_id):
            event = cast(LedgerAggregate.Event, stored)
            fields = {
                k: v
                for k, v in event.__dict__.items()
                if k not in ("originator_id", "originator_version", "timestamp", "meta")
            }
            name = type(event).__name__
            text = json.dumps(fields, default=_plain)
            print(f"  {event.originator_version:>3} {event.timestamp.isoformat()} {name} {text}")
            decision = getattr(event.meta, "decision", None)
            if decision is not None:
                print(
                    f"      decided by {decision.by} at {decision.at.isoformat()}: {decision.why}"
                )
    return 0


def _plain(value: object) -> object:
    """Event fields as a person reads them: times in ISO 8601, ids and states as text."""
    isoformat = getattr(value, "isoformat", None)
    return isoformat() if callable(isoformat) else str(value)


def _who(args: argparse.Namespace) -> str:
    if args.by is not None:  # never empty: ``_decider`` refused that
        return str(args.by)
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        # A container may run as an arbitrary UID with no passwd entry and no USER or
        # LOGNAME (getpass raises KeyError, OSError from Python 3.13): the UID is still who.
        return f"uid {os.getuid()}"


def _retry(args: argparse.Namespace) -> int:
    with open_ledger(settings=checked_settings(args)) as ledger:
        # The ledger's method, not execute(RetrySaga(...)): a refusal of the arguments (a
        # blank reason) is then counted as the ledger counts its own.
        ledger.retry_saga(args.saga_id, _who(args), args.reason)
    print(f"saga {args.saga_id}: compensating again")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with open_ledger(settings=checked_settings(args)) as ledger:
        ledger.cancel_saga(args.saga_id, _who(args), args.reason)  # as in _retry
    print(f"saga {args.saga_id}: cancelled; its compensations will run")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    settings = checked_settings(args, readmodels=True)
    preflight.check_gateway(settings.gateway_url)
    gateway = payment_gateway(settings)
    with open_ledger(settings=settings) as ledger, ReadModels(settings.readmodels) as views:
        if _saga_rows(views, "", [], 1) is None:
            gateway.close()
            return 1
        completed = _completed_orders(views)
        try:
            report = reconcile_payments(ledger, gateway, completed=completed, repair=args.repair)
        except StaleRead as error:
            gateway.close()
            print(f"daybook: the sagas read model could not be read: {error}", file=sys.stderr)
            return 2
    gateway.close()
    for finding in report.findings:
        print(f"  {finding.kind:28} {finding.key}  {finding.action}: {finding.detail}")
    print(f"{report.checked} charges checked, {len(report.findings)} findings")
    return 1 if report.unresolved else 0
