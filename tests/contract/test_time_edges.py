"""Time at the edges: timeouts are seconds of real time whatever zone the clock reads in, and a
hold whose funds were released as lapsed says its expiry is recorded."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from daybook import Ledger, open_ledger

BERLIN = ZoneInfo("Europe/Berlin")


class ZonedClock:
    """An aware clock (accepted by ``open_ledger``) that reads in local time, as
    ``lambda: datetime.now(ZoneInfo("Europe/Berlin"))`` does; moved by the test."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        # Real elapsed time: add in UTC, read back in the zone (as a real clock would).
        self.now = (self.now.astimezone(ZoneInfo("UTC")) + timedelta(seconds=seconds)).astimezone(
            BERLIN
        )


@pytest.fixture
def clock() -> ZonedClock:
    # Noon the day before Berlin moves its clocks forward (2030-03-31 02:00 CET -> 03:00 CEST).
    return ZonedClock(datetime(2030, 3, 30, 12, 0, tzinfo=BERLIN))


@pytest.fixture
def ledger(store_url: str, clock: ZonedClock) -> Iterator[Ledger]:
    ledger = open_ledger(store_url, clock=clock)
    yield ledger
    ledger.close()


def test_a_day_long_hold_lasts_a_day_on_a_clock_in_local_time(
    ledger: Ledger, clock: ZonedClock
) -> None:
    a = ledger.open_account("alice", "EUR").account_id
    assert a is not None
    ledger.deposit(a, 1_000)
    placed_at = clock()
    hold_id = ledger.hold(a, 300, timeout=86_400).hold_id
    assert hold_id is not None
    status = ledger.hold_status(hold_id)
    assert status.expires_at.timestamp() - placed_at.timestamp() == 86_400
    clock.advance(23 * 3600 + 60)  # 23 h 1 min of real time: the hold has an hour to go
    view = ledger.account(a)
    assert (view.held, view.available) == (300, 700)
    assert ledger.hold_status(hold_id).status == "open"


def test_a_reservation_lasts_its_timeout_on_a_clock_in_local_time(
    ledger: Ledger, clock: ZonedClock
) -> None:
    ledger.receive_stock("KETTLE", 5)
    ledger.reserve_stock("KETTLE", 5, reservation_id="r-1", timeout=86_400)
    clock.advance(23 * 3600 + 60)
    assert ledger.inventory("KETTLE").reserved == 5
    ledger.commit_reservation("KETTLE", "r-1")


def test_hold_expired_says_recorded_once_its_funds_release_is_in_the_log(store_url: str) -> None:
    """README, error codes: ``hold_expired``'s ``details["recorded"]`` is "whether its
    expiry, or the release of its funds, is in the log yet". A withdrawal that needed the
    lapsed hold's funds recorded their release (``Account.HoldReleased``, expired)."""
    from datetime import UTC

    from daybook.domain.errors import DomainError

    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    with open_ledger(store_url, clock=lambda: now[0]) as ledger:
        a = ledger.open_account("alice", "EUR").account_id
        assert a is not None
        ledger.deposit(a, 1_000)
        hold_id = ledger.hold(a, 1_000, timeout=60).hold_id
        assert hold_id is not None
        now[0] += timedelta(seconds=61)
        ledger.withdraw(a, 1_000)  # relies on the lapsed hold: its release is recorded
        with pytest.raises(DomainError) as refused:
            ledger.capture(hold_id)
        assert refused.value.code == "hold_expired"
        assert refused.value.details["recorded"] is True
