"""SIGKILL the expiry sweeper just before and just after it records an expiry; after a
restart every expired hold and reservation has its expiry recorded exactly once, and the
money and stock they held are available again."""

from __future__ import annotations

import json
import signal
from uuid import UUID

import pytest

from daybook import Ledger, open_ledger
from daybook.domain.holds import Hold
from daybook.domain.inventory import Inventory
from tests.integration.killed import done_or_killed, run_module


def run_sweeper(url: str, setup: dict[str, object], faults: str | None) -> int:
    worker = "tests.integration.expiry_worker"
    return done_or_killed(run_module(worker, [json.dumps({"url": url, **setup})], faults), faults)


def topics(ledger: Ledger, aggregate_id: UUID) -> list[str]:
    """The topics of an aggregate's stored events, oldest first."""
    return [event.topic for event in ledger.service.recorder.select_events(aggregate_id)]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize(
    ("point", "passages"),
    [
        # Before: the n-th candidate of a run (refused ones count, as a restarted sweeper
        # may list an expiry recorded by the run before until its read model catches up).
        ("expiry.before_record", (1, 2, 3)),
        # After: the first expiry each run records (a hold, a hold, a hold, the stock).
        ("expiry.after_record", (1, 1, 1, 1)),
    ],
)
def test_sigkill_around_recording_an_expiry(
    pg_url: str, point: str, passages: tuple[int, ...]
) -> None:
    with open_ledger(pg_url) as ledger:
        account = ledger.open_account("ann", "EUR").account_id
        assert account is not None
        ledger.deposit(account, 1_000)
        holds = []
        for amount in (100, 200, 300):
            hold_id = ledger.hold(account, amount, timeout=60).hold_id
            assert hold_id is not None
            holds.append(hold_id)
        ledger.receive_stock("KETTLE", 10)
        reservations = [f"r-{n}" for n in range(3)]
        for reservation in reservations:
            ledger.reserve_stock("KETTLE", 2, reservation_id=reservation, timeout=60)
        # The sweepers run 120 s ahead: every hold and reservation has expired for them.
        setup = {
            "holds": [str(h) for h in holds],
            "sku": "KETTLE",
            "reservations": reservations,
            "clock_offset": 120,
        }
        for passage in passages:
            code = run_sweeper(pg_url, setup, f"{point}:{passage}")
            assert code == -signal.SIGKILL, f"{point}:{passage} was not reached"
        run_sweeper(pg_url, setup, None)

        for hold_id in holds:
            hold = ledger.read(Hold, hold_id)
            recorded = [t for t in topics(ledger, hold.id) if t.endswith(":Hold.Expired")]
            assert len(recorded) == 1, topics(ledger, hold.id)
            assert hold.view().recorded
        assert ledger.account(account).available == ledger.account(account).balance == 1_000
        inventory = ledger.read(Inventory, "KETTLE")
        expired = [
            t for t in topics(ledger, inventory.id) if t.endswith(":Inventory.ReservationExpired")
        ]
        assert len(expired) == len(reservations), topics(ledger, inventory.id)
        assert inventory.reservations == {}
        assert ledger.inventory("KETTLE").available == 10
