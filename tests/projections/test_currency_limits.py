"""Amounts near 2**63-1 in several currencies (with minor units of 0 to 4 digits, and none),
on every backend: the read models match a replay and never mix currencies."""

from __future__ import annotations

from daybook import Ledger, projections, run_projections
from daybook.infrastructure.lifecycle import ServiceState
from tests.projections.helpers import assert_tables_match
from tests.projections.test_runner import ledger, url

__all__ = ["ledger", "url"]  # the fixtures

M = 2**63 - 1


def test_big_amounts_in_many_currencies_match_a_replay(ledger: Ledger, url: str) -> None:
    for cur in ["JPY", "KWD", "CLF", "XAU", "EUR"]:
        a = ledger.open_account(owner="a" + cur, currency=cur, overdraft_limit=M).account_id
        b = ledger.open_account(owner="b" + cur, currency=cur, overdraft_limit=M).account_id
        assert a is not None and b is not None
        ledger.withdraw(a, M)
        ledger.deposit(a, M)
        ledger.deposit(a, M)
        ledger.transfer(a, b, M)
        ledger.transfer(b, a, M)
        ledger.capture(ledger.hold(a, M, destination=b, timeout=60).hold_id or "")
        ledger.capture(ledger.hold(b, M, timeout=60).hold_id or "", 5)
    with run_projections(ledger, url, poll_interval=0.01) as runner:
        activity = runner.views.daily_activity(days=2, min_position=ledger.head(), timeout=30)
        snap = runner.views.balances(min_position=ledger.head(), timeout=30)
        assert runner.versions_health().state is ServiceState.RUNNING
    (day,) = activity.days
    assert set(day.money) == {"JPY", "KWD", "CLF", "XAU", "EUR"}
    for money in day.money.values():
        assert money["deposit_volume"] == 2 * M
        assert money["transfer_volume"] == 3 * M
        assert money["withdrawal_volume"] == M + 5
    assert snap.totals == {c: M - 5 for c in ["JPY", "KWD", "CLF", "XAU", "EUR"]}
    for projection in projections.ALL:
        assert_tables_match(ledger, url, projection)
