"""A ledger written by daybook 0.1 (event topics under ``domain.*``) still loads.

``tests/fixtures/ledger-v0.1.db`` was written by daybook 0.1 before its layers moved under
the ``daybook`` package: three accounts (one closed), a transfer, a refused withdrawal, and
one SKU with a committed and a released reservation.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from uuid import UUID

import pytest

from daybook import InsufficientFunds, open_ledger, projections
from daybook.infrastructure.bootstrap import event_log_of

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ledger-v0.1.db"
ANN = UUID("8f966467-1b2a-4440-9107-a142e7c5c17b")
BOB = UUID("29207451-24ea-44f0-9e59-f5b8943999f4")
CY = UUID("67c20dc5-d9eb-4454-b3e2-f67f803db350")


@pytest.fixture
def url(tmp_path: Path) -> str:
    copy = tmp_path / "ledger-v0.1.db"
    shutil.copy(FIXTURE, copy)
    return f"sqlite:///{copy}"


def test_aggregates_written_before_the_move_load(url: str) -> None:
    with open_ledger(url) as ledger:
        ann, bob, cy = ledger.account(ANN), ledger.account(BOB), ledger.account(CY)
        assert (ann.balance, ann.available, ann.overdraft_limit) == (6_000, 6_100, 100)
        assert (bob.balance, cy.status) == (2_500, "closed")
        stock = ledger.inventory("SKU-1")
        assert (stock.on_hand, stock.reserved, stock.available) == (7, 0, 7)
        assert ledger.head() == 15


def test_requests_recorded_before_the_move_replay(url: str) -> None:
    with open_ledger(url) as ledger:
        receipt = ledger.transfer(ANN, BOB, 2_500, request_id="fixture-transfer")
        assert receipt.replayed
        with pytest.raises(InsufficientFunds):
            ledger.withdraw(BOB, 10**9, request_id="fixture-refused")
        assert ledger.head() == 15
        ledger.deposit(BOB, 1, request_id="after-the-move")
        assert ledger.account(BOB).balance == 2_501


def test_projections_read_the_old_log(url: str) -> None:
    with open_ledger(url) as ledger:
        reader = event_log_of(ledger)
        events = reader.read(0, 100)
        reader.close()
    assert len(events) == 15
    balances = projections.replay(projections.ACCOUNT_BALANCES, events)
    row = balances.tables["account_balances"][(str(ANN),)]
    assert (row["balance"], row["available"]) == (6_000, 6_100)
