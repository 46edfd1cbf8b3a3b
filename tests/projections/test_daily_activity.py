"""Daily stock activity counts every unit a reservation gave back: shipped, released, or
expired (its timeout passed), so that reserved - shipped - released is what is still held."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from daybook import open_ledger, run_projections


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def test_an_expired_reservation_counts_as_released(tmp_path: Path) -> None:
    clock = Clock()
    with open_ledger(f"sqlite:///{tmp_path}/ledger.db", clock=clock) as ledger:
        ledger.receive_stock("SKU-1", 10)
        ledger.reserve_stock("SKU-1", 3, reservation_id="r-1", timeout=5)
        ledger.reserve_stock("SKU-1", 2, reservation_id="r-2")
        ledger.commit_reservation("SKU-1", "r-2", quantity=1)  # ships 1, releases 1
        clock.now += timedelta(seconds=10)
        ledger.expire_reservation("SKU-1", "r-1")
        with run_projections(ledger, f"sqlite:///{tmp_path}/views.db") as runner:
            head = ledger.head()
            stock = runner.views.stock("SKU-1", min_position=head, timeout=10)
            assert stock is not None and stock.reserved == 0  # every unit is back or shipped
            # Events carry the wall clock's time: today, whatever the ledger's clock says.
            days = runner.views.daily_activity(
                days=2, today=datetime.now(UTC).date(), min_position=head, timeout=10
            ).days
    reserved = sum(day.reserved for day in days)
    settled = sum(day.shipped + day.released for day in days)
    assert (reserved, settled) == (5, 5), days
    assert sum(day.released for day in days) == 4  # 1 released on commit, 3 expired
