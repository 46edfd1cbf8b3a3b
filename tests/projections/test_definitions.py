"""Projection definitions, run by the pure in-memory replay (no database)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daybook import Ledger, open_ledger
from daybook.projections import (
    ACCOUNT_BALANCES,
    ACCOUNT_STATEMENT,
    DAILY_ACTIVITY,
    INVENTORY_LEVELS,
)
from daybook.projections.model import LogEvent, MemoryRows
from tests.projections.helpers import expected_rows, workload


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    with open_ledger("memory://") as ledger:
        yield ledger


def test_balances_and_stock_agree_with_the_write_model(ledger: Ledger) -> None:
    ids = workload(ledger, 300)
    balances = expected_rows(ledger, ACCOUNT_BALANCES).tables["account_balances"]
    for account_id in ids:
        view = ledger.account(account_id)
        row = balances[(str(account_id),)]
        assert (row["balance"], row["available"], row["version"]) == (
            view.balance,
            view.available,
            view.version,
        )
    levels = expected_rows(ledger, INVENTORY_LEVELS).tables["inventory_levels"]
    by_sku = {row["sku"]: row for row in levels.values()}
    for sku in ("SKU-1", "SKU-2"):
        stock = ledger.inventory(sku)
        row = by_sku[sku]
        assert (row["on_hand"], row["reserved"], row["available"]) == (
            stock.on_hand,
            stock.reserved,
            stock.available,
        )


def test_statement_running_balance_ends_at_the_balance(ledger: Ledger) -> None:
    ids = workload(ledger, 200)
    rows = expected_rows(ledger, ACCOUNT_STATEMENT)
    for account_id in ids:
        entries = sorted(
            (
                r
                for r in rows.tables["account_statement"].values()
                if r["account_id"] == str(account_id)
            ),
            key=lambda r: int(r["seq"] or 0),
        )
        running = 0
        for entry in entries:
            running += int(entry["amount"] or 0)
            assert entry["balance"] == running
        assert running == ledger.account(account_id).balance


def test_daily_activity_counts_every_movement_once(ledger: Ledger) -> None:
    a = ledger.open_account("a", "EUR").account_id
    b = ledger.open_account("b", "EUR").account_id
    ledger.deposit(a, 100)
    ledger.deposit(a, 50)
    ledger.withdraw(a, 30)
    ledger.transfer(a, b, 20)
    ledger.receive_stock("SKU-9", 10)
    r1 = ledger.reserve_stock("SKU-9", 4)
    r2 = ledger.reserve_stock("SKU-9", 3)
    ledger.commit_reservation("SKU-9", r1.reservation_id or "", 3)
    ledger.release_reservation("SKU-9", r2.reservation_id or "")
    rows = expected_rows(ledger, DAILY_ACTIVITY)
    (money,) = rows.tables["daily_money"].values()
    assert (money["deposits"], money["deposit_volume"]) == (2, 150)
    assert (money["withdrawals"], money["withdrawal_volume"]) == (1, 30)
    assert (money["transfers"], money["transfer_volume"]) == (1, 20)
    (stock,) = rows.tables["daily_stock"].values()
    assert (stock["reserved"], stock["shipped"], stock["released"]) == (7, 3, 4)


def test_an_event_for_an_unknown_account_is_an_error_not_a_silent_skip() -> None:
    from datetime import UTC, datetime

    event = LogEvent(7, "Account.Deposited", "no-such-account", 2, datetime.now(UTC), {"amount": 5})
    rows = MemoryRows(ACCOUNT_BALANCES)
    try:
        ACCOUNT_BALANCES.apply(event, rows)
    except LookupError as error:
        assert "position 7" in str(error)
    else:
        raise AssertionError("expected a LookupError")
