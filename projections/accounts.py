"""Account read models: current balances, and a statement with a running balance."""

from __future__ import annotations

from daybook.domain.accounts import Account
from daybook.domain.values import MAX_AMOUNT
from daybook.projections.model import (
    Column,
    Handler,
    LogEvent,
    Projection,
    Row,
    Rows,
    Table,
    event_type,
    iso_time,
)

OPENED = event_type(Account.Opened)
DEPOSITED = event_type(Account.Deposited)
WITHDRAWN = event_type(Account.Withdrawn)
TRANSFERRED_OUT = event_type(Account.TransferredOut)
TRANSFERRED_IN = event_type(Account.TransferredIn)
CLOSED = event_type(Account.Closed)
HOLD_PLACED = event_type(Account.HoldPlaced)
HOLD_RELEASED = event_type(Account.HoldReleased)

#: Signed effect of each money event on the balance.
MONEY_SIGN = {DEPOSITED: 1, WITHDRAWN: -1, TRANSFERRED_OUT: -1, TRANSFERRED_IN: 1}

BALANCES = Table(
    "account_balances",
    (
        Column("account_id"),
        Column("owner"),
        Column("currency"),
        Column("balance", "bigint"),
        # Held by open holds until their release or expiry is in the log (the write side
        # stops counting a hold the instant it expires; a read model cannot, and follows
        # the hold sweeper's record of it).
        Column("held", "bigint"),
        Column("available", "bigint"),
        Column("overdraft_limit", "bigint"),
        Column("status"),
        Column("version", "bigint"),
        Column("last_event_at"),
        Column("position", "bigint"),
    ),
    key=("account_id",),
    indexes=(("owner",),),
)


def _opened(event: LogEvent, rows: Rows) -> None:
    data = event.data
    rows.put(
        BALANCES.name,
        {
            "account_id": event.originator_id,
            "owner": data["owner"],
            "currency": data["currency"],
            "balance": 0,
            "held": 0,
            "available": data["overdraft_limit"],
            "overdraft_limit": data["overdraft_limit"],
            "status": "open",
            "version": event.originator_version,
            "last_event_at": iso_time(event.timestamp),
            "position": event.position,
        },
    )


def _available(balance: int, held: int, row: Row) -> int:
    """What can be spent, as a bigint holds it. Credits keep balance + overdraft limit
    within 2**63-1, but a log written before they did may pass it: such an account shows
    2**63-1 rather than stop the read model for every account. (No new version: a row past
    it could never be written, so no table built before differs.)"""
    return min(balance - held + int(row["overdraft_limit"] or 0), MAX_AMOUNT)


def _existing(rows: Rows, table: str, event: LogEvent) -> Row:
    row = rows.get(table, (event.originator_id,))
    if row is None:
        msg = f"{event.type} at position {event.position} for unknown account {event.originator_id}"
        raise LookupError(msg)
    return row


def _money(event: LogEvent, rows: Rows) -> None:
    row = _existing(rows, BALANCES.name, event)
    balance = int(row["balance"] or 0) + MONEY_SIGN[event.type] * int(event.data["amount"])
    rows.put(
        BALANCES.name,
        {
            **row,
            "balance": balance,
            "available": _available(balance, int(row["held"] or 0), row),
            "version": event.originator_version,
            "last_event_at": iso_time(event.timestamp),
            "position": event.position,
        },
    )


def _held(event: LogEvent, rows: Rows) -> None:
    row = _existing(rows, BALANCES.name, event)
    sign = 1 if event.type == HOLD_PLACED else -1
    held = int(row["held"] or 0) + sign * int(event.data["amount"])
    rows.put(
        BALANCES.name,
        {
            **row,
            "held": held,
            "available": _available(int(row["balance"] or 0), held, row),
            "version": event.originator_version,
            "last_event_at": iso_time(event.timestamp),
            "position": event.position,
        },
    )


def _closed(event: LogEvent, rows: Rows) -> None:
    row = _existing(rows, BALANCES.name, event)
    rows.put(
        BALANCES.name,
        {
            **row,
            "status": "closed",
            "version": event.originator_version,
            "last_event_at": iso_time(event.timestamp),
            "position": event.position,
        },
    )


ACCOUNT_BALANCES = Projection(
    name="account_balances",
    version=1,
    tables=(BALANCES,),
    handlers={
        OPENED: _opened,
        DEPOSITED: _money,
        WITHDRAWN: _money,
        TRANSFERRED_OUT: _money,
        TRANSFERRED_IN: _money,
        CLOSED: _closed,
        HOLD_PLACED: _held,
        HOLD_RELEASED: _held,
    },
)

STATEMENT = Table(
    "account_statement",
    (
        Column("account_id"),
        Column("seq", "bigint"),
        Column("position", "bigint"),
        Column("occurred_at"),
        Column("kind"),
        Column("amount", "bigint"),
        Column("balance", "bigint"),
        Column("transfer_id", nullable=True),
        Column("counterparty", nullable=True),
    ),
    key=("account_id", "seq"),
    append_only=True,
)

#: The running balance each statement continues from (entries are never read back).
STATEMENT_HEADS = Table(
    "account_statement_heads",
    (Column("account_id"), Column("balance", "bigint"), Column("entries", "bigint")),
    key=("account_id",),
)

_KINDS = {
    DEPOSITED: "deposit",
    WITHDRAWN: "withdrawal",
    TRANSFERRED_OUT: "transfer_out",
    TRANSFERRED_IN: "transfer_in",
}


def _statement_opened(event: LogEvent, rows: Rows) -> None:
    rows.put(STATEMENT_HEADS.name, {"account_id": event.originator_id, "balance": 0, "entries": 0})


def _statement_entry(event: LogEvent, rows: Rows) -> None:
    head = _existing(rows, STATEMENT_HEADS.name, event)
    amount = MONEY_SIGN[event.type] * int(event.data["amount"])
    balance = int(head["balance"] or 0) + amount
    rows.put(
        STATEMENT.name,
        {
            "account_id": event.originator_id,
            "seq": event.originator_version,
            "position": event.position,
            "occurred_at": iso_time(event.timestamp),
            "kind": _KINDS[event.type],
            "amount": amount,
            "balance": balance,
            "transfer_id": event.data.get("transfer_id"),
            "counterparty": event.data.get("counterparty"),
        },
    )
    rows.put(
        STATEMENT_HEADS.name,
        {**head, "balance": balance, "entries": int(head["entries"] or 0) + 1},
    )


_entry_handlers: dict[str, Handler] = {kind: _statement_entry for kind in _KINDS}

ACCOUNT_STATEMENT = Projection(
    name="account_statement",
    version=1,
    tables=(STATEMENT, STATEMENT_HEADS),
    handlers={OPENED: _statement_opened, **_entry_handlers},
)
