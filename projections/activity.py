"""Daily activity for dashboards: money movements per day and currency, stock per day."""

from __future__ import annotations

from daybook.projections.accounts import (
    DEPOSITED,
    OPENED,
    TRANSFERRED_OUT,
    WITHDRAWN,
)
from daybook.projections.inventory import COMMITTED, EXPIRED, RELEASED, RESERVED
from daybook.projections.model import Column, LogEvent, Projection, Row, Rows, Table, day_of

MONEY = Table(
    "daily_money",
    (
        Column("day"),
        Column("currency"),
        Column("deposits", "bigint"),
        Column("deposit_volume", "numeric"),
        Column("withdrawals", "bigint"),
        Column("withdrawal_volume", "numeric"),
        Column("transfers", "bigint"),
        Column("transfer_volume", "numeric"),
    ),
    key=("day", "currency"),
    summed=True,
)

STOCK = Table(
    "daily_stock",
    (
        Column("day"),
        Column("reserved", "numeric"),
        Column("shipped", "numeric"),
        Column("released", "numeric"),
    ),
    key=("day",),
    summed=True,
)

#: Money events carry no currency; the projection remembers each account's.
CURRENCIES = Table(
    "daily_account_currencies",
    (Column("account_id"), Column("currency")),
    key=("account_id",),
)

_MONEY_COLUMNS = {
    DEPOSITED: ("deposits", "deposit_volume"),
    WITHDRAWN: ("withdrawals", "withdrawal_volume"),
    # One transfer is two events; count the outgoing side only.
    TRANSFERRED_OUT: ("transfers", "transfer_volume"),
}


def _opened(event: LogEvent, rows: Rows) -> None:
    rows.put(
        CURRENCIES.name, {"account_id": event.originator_id, "currency": event.data["currency"]}
    )


def _money(event: LogEvent, rows: Rows) -> None:
    account = rows.get(CURRENCIES.name, (event.originator_id,))
    if account is None:
        msg = f"{event.type} at position {event.position} for unknown account {event.originator_id}"
        raise LookupError(msg)
    day, currency = day_of(event.timestamp), account["currency"]
    row: Row = rows.get(MONEY.name, (day, currency)) or {
        "day": day,
        "currency": currency,
        **{name: 0 for name in MONEY.column_names[2:]},
    }
    count, volume = _MONEY_COLUMNS[event.type]
    rows.put(
        MONEY.name,
        {
            **row,
            count: int(row[count] or 0) + 1,
            volume: int(row[volume] or 0) + int(event.data["amount"]),
        },
    )


def _stock(event: LogEvent, rows: Rows, reserved: int, shipped: int, released: int) -> None:
    day = day_of(event.timestamp)
    row: Row = rows.get(STOCK.name, (day,)) or {
        "day": day,
        "reserved": 0,
        "shipped": 0,
        "released": 0,
    }
    rows.put(
        STOCK.name,
        {
            "day": day,
            "reserved": int(row["reserved"] or 0) + reserved,
            "shipped": int(row["shipped"] or 0) + shipped,
            "released": int(row["released"] or 0) + released,
        },
    )


def _reserved(event: LogEvent, rows: Rows) -> None:
    _stock(event, rows, int(event.data["quantity"]), 0, 0)


def _committed(event: LogEvent, rows: Rows) -> None:
    _stock(event, rows, 0, int(event.data["shipped"]), int(event.data["released"]))


def _released(event: LogEvent, rows: Rows) -> None:
    _stock(event, rows, 0, 0, int(event.data["quantity"]))


DAILY_ACTIVITY = Projection(
    name="daily_activity",
    # 2: an expired reservation's units count as released, as a released one's do (version
    # 1 left them out, so reserved - shipped - released grew with every expiry).
    # 3: volumes and units are ``numeric``: every amount fits 64 bits, a day's total of them
    # need not (in version 2 such a day stopped the projection for every day).
    version=3,
    tables=(MONEY, STOCK, CURRENCIES),
    handlers={
        OPENED: _opened,
        DEPOSITED: _money,
        WITHDRAWN: _money,
        TRANSFERRED_OUT: _money,
        RESERVED: _reserved,
        COMMITTED: _committed,
        RELEASED: _released,
        EXPIRED: _released,
    },
)
