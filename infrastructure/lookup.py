"""``daybook balance ID``, ``daybook stock SKU``, ``daybook statement ID``: a quick look at the
read models from a terminal, each answer saying which log position it reflects."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any
from uuid import UUID

from daybook.domain.errors import DomainError
from daybook.domain.values import check_sku
from daybook.infrastructure.bootstrap import open_event_log, open_read_models
from daybook.infrastructure.cli import (
    add_readmodels_argument,
    add_url_argument,
    checked_settings,
    command,
    seconds,
    uuid_argument,
    whole_number,
)
from daybook.infrastructure.readmodels import ReadModels, StaleRead
from daybook.infrastructure.readmodels.queries import MAX_PAGE

_ACCOUNT_ID = uuid_argument("account id")
_ID = "0b7c6f0e-5a56-4a9e-9d6a-2f4f0e1c2d3b"
_PG = "postgresql://daybook@localhost/daybook"


def register(subparsers: Any) -> None:
    balance = command(
        subparsers,
        "balance",
        help="an account's balance, from the read models",
        description=(
            "An account's balance and available amount as the account_balances read model "
            "has it, with the log position it reflects and how far the log's head is ahead."
        ),
        examples=[
            f"daybook balance {_ID}",
            f"daybook balance {_ID} --url {_PG} --min-position 1200 --timeout 5",
            f"daybook balance {_ID} --readmodels-url sqlite:///views.db --json",
        ],
    )
    balance.add_argument("account_id", type=_ACCOUNT_ID, help="the account's id (a UUID)")
    _common(balance)
    balance.set_defaults(handler=_balance)

    stock = command(
        subparsers,
        "stock",
        help="a SKU's stock levels, from the read models",
        description="On hand, reserved and available units of a SKU as the inventory_levels "
        "read model has them, with the log position it reflects.",
        examples=[
            "daybook stock SKU-KETTLE",
            f"daybook stock SKU-MUG --url {_PG} --min-position 1200 --timeout 5",
            "daybook stock SKU-TEAPOT --readmodels-url sqlite:///views.db --json",
        ],
    )
    stock.add_argument("sku", type=_sku, help="the SKU")
    _common(stock)
    stock.set_defaults(handler=_stock)

    statement = command(
        subparsers,
        "statement",
        help="an account's newest statement entries, from the read models",
        description="An account's statement entries, newest first, with the running balance "
        "after each, from the account_statement read model.",
        examples=[
            f"daybook statement {_ID}",
            f"daybook statement {_ID} --limit 100 --before 5000",
            f"daybook statement {_ID} --url {_PG} --min-position 1200 --timeout 5 --json",
            f"daybook statement {_ID} --readmodels-url sqlite:///views.db",
        ],
    )
    statement.add_argument("account_id", type=_ACCOUNT_ID, help="the account's id (a UUID)")
    statement.add_argument(
        "--limit", type=whole_number(1, MAX_PAGE), default=20, help="entries to show, at most"
    )
    statement.add_argument(
        "--before",
        type=whole_number(1),
        help="only entries before this sequence number (the next page; default: the newest)",
    )
    _common(statement)
    statement.set_defaults(handler=_statement)


def _common(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_readmodels_argument(parser)
    parser.add_argument(
        "--min-position",
        type=whole_number(0),
        help="wait until the read model reflects this log position (a receipt's position; "
        "default: answer at once)",
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=2.0,
        help="seconds to wait for --min-position (not reached by then: exit status 75, try "
        "again later)",
    )
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")


def _sku(text: str) -> str:
    try:
        return check_sku(text)
    except DomainError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@contextmanager
def _views(args: argparse.Namespace) -> Iterator[ReadModels]:
    settings = checked_settings(args, readmodels=True)
    log = open_event_log(settings=settings)
    try:
        with open_read_models(settings=settings, log=log) as views:
            yield views
    finally:
        log.close()


def _wait(args: argparse.Namespace) -> dict[str, Any]:
    if args.min_position is None:
        return {"timeout": 0.0}
    return {"min_position": args.min_position, "timeout": args.timeout}


def _not_serving(projection: str, error: StaleRead) -> int:
    # Never begun, with --min-position or without: 75 ("not yet") would have a script
    # retry for ever, and nothing would ever build it.
    if error.wanted == 0 or not error.started:
        print(
            f"daybook: the {projection} read model has not been built here yet: run "
            "`daybook project` (or `daybook serve`, which keeps the read models up to date)",
            file=sys.stderr,
        )
        return 1
    raise error


def _behind(position: int, lag: int | None, later: bool = False) -> str:
    # A stream group's version may hold some events after its position already (a
    # partition ahead of another): said, as --json, HTTP and `projections status` say it.
    text = f"as of log position {position}"
    if later:
        text += "+ (may include some later events)"
    if lag is None:
        return text
    return f"{text} ({lag} events behind the head)"


def _no_account(account_id: UUID, position: int) -> int:
    print(
        f"daybook: no account {account_id} in the read model as of log position "
        f"{position}; if it was opened just now, pass its receipt's --min-position",
        file=sys.stderr,
    )
    return 1


def _balance(args: argparse.Namespace) -> int:
    with _views(args) as views:
        try:
            # One read: "not found" names the position of the snapshot it was not in.
            answer = views.find_balance(args.account_id, **_wait(args))
            found, position = answer.value, answer.as_of_position
        except StaleRead as error:
            return _not_serving("account_balances", error)
    if found is None:
        return _no_account(args.account_id, position)
    if args.json:
        print(json.dumps(asdict(found), default=str))
        return 0
    print(f"account {found.account_id} ({found.owner}, {found.currency}, {found.status})")
    print(
        f"balance {found.balance:,}  available {found.available:,}  held {found.held:,}  "
        f"overdraft limit {found.overdraft_limit:,}"
    )
    print(_behind(found.as_of_position, found.lag_events, found.includes_later))
    return 0


def _stock(args: argparse.Namespace) -> int:
    with _views(args) as views:
        try:
            answer = views.find_stock(args.sku, **_wait(args))
            found, position = answer.value, answer.as_of_position
        except StaleRead as error:
            return _not_serving("inventory_levels", error)
    if found is None:
        print(
            f"daybook: no stock of {args.sku} in the read model as of log position {position}",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(asdict(found)))
        return 0
    print(
        f"{found.sku}: on hand {found.on_hand:,}  reserved {found.reserved:,}  "
        f"available {found.available:,}"
    )
    print(_behind(found.as_of_position, found.lag_events, found.includes_later))
    return 0


def _statement(args: argparse.Namespace) -> int:
    with _views(args) as views:
        try:
            answer = views.find_statement(
                args.account_id, limit=args.limit, before_seq=args.before, **_wait(args)
            )
            found, position = answer.value, answer.as_of_position
        except StaleRead as error:
            return _not_serving("account_statement", error)
    if found is None:
        return _no_account(args.account_id, position)
    if args.json:
        print(json.dumps(asdict(found), default=str))
        return 0
    if not found.entries:
        print(f"no statement entries for {args.account_id}")
    for entry in found.entries:
        other = f"  with {entry.counterparty}" if entry.counterparty else ""
        print(
            f"{entry.seq:>6}  {entry.occurred_at}  {entry.kind:<14} {entry.amount:>14,}  "
            f"balance {entry.balance:>14,}{other}"
        )
    print(_behind(found.as_of_position, found.lag_events, found.includes_later))
    if found.older:
        print(f"older entries: --before {found.entries[-1].seq}")
    return 0
