"""Open holds in the read models, and the sweeper that records expiries (injected clock)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from uuid import uuid4

import psycopg
import pytest

from daybook import Ledger, open_ledger, run_projections
from daybook.domain.errors import ConcurrencyConflict, DomainError
from daybook.domain.holds import ExpireHold, HoldResolved
from daybook.infrastructure.expiry import ExpirySweeper, open_holds
from daybook.infrastructure.lifecycle import Health, RestartPolicy, ServiceState
from daybook.projections import ACCOUNT_BALANCES, OPEN_HOLDS_PROJECTION
from tests.projections.helpers import assert_tables_match


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(shared_store_url: str, clock: Clock) -> Iterator[Ledger]:
    ledger = open_ledger(shared_store_url, clock=clock)
    yield ledger
    ledger.close()


def test_open_holds_refuses_bad_arguments_with_a_code(ledger: Ledger) -> None:
    """``open_holds`` is a documented read: a text where a datetime goes raised an
    AttributeError traceback, and an account id that is not one answered an empty list."""
    account = ledger.open_account("a", "EUR").account_id
    ledger.deposit(account, 100)
    ledger.hold(account, 10, timeout=60)
    with run_projections(ledger) as runner:
        for arguments in (
            {"expiring_before": "tomorrow"},
            {"expiring_before": datetime(2030, 1, 1)},  # no time zone: which 2030?
            {"account_id": "nope"},
        ):
            with pytest.raises(DomainError) as refused:
                open_holds(runner.views, **arguments)  # type: ignore[arg-type]
            assert refused.value.code == "invalid_request", arguments
        answer = open_holds(
            runner.views, account_id=str(account).upper(), min_position=ledger.head(), timeout=60
        )
        assert len(answer.value) == 1


def test_open_holds_soonest_first_and_the_sweeper_records_expiries(
    ledger: Ledger, clock: Clock, shared_store_url: str
) -> None:
    a = ledger.open_account("a", "EUR").account_id
    b = ledger.open_account("b", "EUR").account_id
    assert a is not None and b is not None
    ledger.deposit(a, 1_000)
    late = ledger.hold(a, 100, timeout=60).hold_id
    soon = ledger.hold(a, 200, destination=b, timeout=10).hold_id
    captured = ledger.hold(a, 50, timeout=5).hold_id
    assert captured is not None
    ledger.capture(captured)
    ledger.receive_stock("SKU-X", 5)
    ledger.reserve_stock("SKU-X", 3, timeout=10, reservation_id="r-1")
    ledger.reserve_stock("SKU-X", 1, reservation_id="r-2")
    with run_projections(ledger) as runner:
        head = ledger.head()
        answer = open_holds(runner.views, account_id=a, min_position=head, timeout=60)
        assert [h.hold_id for h in answer.value] == [soon, late]
        assert answer.value[0].destination == b and answer.value[0].amount == 200
        balance = runner.views.balance(a, min_position=head)
        assert balance is not None and (balance.held, balance.available) == (300, 650)

        sweeper = ExpirySweeper(ledger, runner.views)
        assert sweeper.sweep() == 0  # nothing is due yet
        clock.now += timedelta(seconds=10)
        assert ledger.account(a).held == 100  # exact at once, before any record
        assert sweeper.sweep() == 2  # the hold and the reservation
        assert ledger.hold_status(soon).recorded  # type: ignore[arg-type]
        assert sweeper.sweep() == 0  # the read model may lag: refused, skipped
        head = ledger.head()
        answer = open_holds(runner.views, min_position=head)
        assert [h.hold_id for h in answer.value] == [late]
        balance = runner.views.balance(a, min_position=head)
        assert balance is not None and (balance.held, balance.available) == (100, 850)
        stock = runner.views.stock("SKU-X", min_position=head)
        assert stock is not None and (stock.reserved, stock.available) == (1, 4)

        clock.now += timedelta(seconds=60)
        sweeper.interval = 0.01
        sweeper.start()
        try:
            for _ in range(500):
                if sweeper.recorded == 3:
                    break
                runner.views.balance(a, min_position=ledger.head())
                clock.now += timedelta(microseconds=1)
        finally:
            sweeper.stop()
        assert sweeper.recorded == 3
        assert sweeper.health().state is ServiceState.STOPPED
        runner.views.balance(a, min_position=ledger.head())
        for projection in (ACCOUNT_BALANCES, OPEN_HOLDS_PROJECTION):
            assert_tables_match(ledger, runner.location.url, projection)
    assert ledger.account(a).held == 0


def test_a_contended_expiry_is_left_to_the_next_sweep(clock: Clock) -> None:
    """An expiry that met other writers past the ledger's retries is not a failure of the
    sweeper (several may run side by side): it is skipped, and still listed for the next."""

    class Contended:
        def execute(self, command: object) -> None:
            raise ConcurrencyConflict("gave up after 40 attempts; retry the request")

    sweeper = ExpirySweeper(Contended(), None, clock=clock)  # type: ignore[arg-type]
    assert sweeper._record(ExpireHold(uuid4())) == 0


class DownViews:
    """A read-model database behind a partition: every read waits for its connect timeout
    (shortened here), then fails as an outage."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.calls = 0

    def rows(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        time.sleep(self.wait)
        raise psycopg.OperationalError("connection timeout expired")

    count = rows

    def close(self) -> None:
        pass


def test_the_sweeper_never_says_it_runs_through_an_outage_it_never_got_past(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each attempt of an outage said ``running`` (so /health 200) while it waited to time
    out, counted a restart and logged "recovered"."""
    caplog.set_level(logging.INFO, logger="daybook.services")
    ledger = open_ledger("memory://")
    views = DownViews(wait=0.3)
    sweeper = ExpirySweeper(
        ledger,
        views,  # type: ignore[arg-type]
        interval=0.05,
        policy=RestartPolicy(initial=0.01, ceiling=0.05),
    )
    seen: list[Health] = []
    sweeper.start()
    try:
        while views.calls < 2:  # from the first failure on
            time.sleep(0.01)
        while views.calls < 8:
            seen.append(sweeper.health())
            time.sleep(0.02)
    finally:
        sweeper.stop()
        ledger.close()
    assert sweeper.recorded == 0  # not one sweep got through
    assert {h.state for h in seen} == {ServiceState.RETRYING}, seen
    assert {h.restarts for h in seen} == {0}, seen
    assert not [r for r in caplog.records if "recovered" in r.getMessage()]


def test_open_holds_answers_an_instant_at_the_calendar_s_edge_in_any_zone(
    ledger: Ledger,
) -> None:
    """An aware ``expiring_before`` at the calendar's edge in a zone other than UTC (no
    bound, as a caller may write it) raised OverflowError, with no code: it lists every
    open hold before the end of time, and none before its start."""
    from datetime import timezone

    account = ledger.open_account("a", "EUR").account_id
    ledger.deposit(account, 100)
    ledger.hold(account, 10, timeout=60)
    with run_projections(ledger) as runner:
        for edge, listed in (
            (datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))), 1),
            (datetime.min.replace(tzinfo=timezone(timedelta(hours=1))), 0),
        ):
            answer = open_holds(
                runner.views, expiring_before=edge, min_position=ledger.head(), timeout=60
            )
            assert len(answer.value) == listed, edge


class SharedPages:
    """The open_holds read model as a sweeper beside another sees it: pages of due holds,
    of which the other sweeper records every second one first."""

    def __init__(self, pages: int, batch: int) -> None:
        self.pages = [[{"hold_id": str(uuid4())} for _ in range(batch)] for _ in range(pages)]
        self.served = 0

    def rows(self, projection: object, table: str, **kwargs: object) -> object:
        page: list[dict[str, str]] = []
        if table == "open_holds" and self.pages:
            page = self.pages.pop(0)
            self.served += 1
        return SimpleNamespace(value=page)

    def count(self, *args: object, **kwargs: object) -> object:
        return SimpleNamespace(value={})


class HalfRecordedElsewhere:
    def __init__(self) -> None:
        self.sent = 0

    def execute(self, command: object) -> None:
        self.sent += 1
        if self.sent % 2:
            raise HoldResolved("its expiry is recorded already")


def test_a_sweeper_beside_another_sweeps_a_full_page_again_at_once(clock: Clock) -> None:
    """A sweeper whose page of due expiries was full sweeps again at once. Beside another
    (two `daybook serve`), which records part of each page first, it counted only its own
    records, never saw a full page, and slept its interval with the backlog still due: one
    page per interval for both. (The interval here is an hour: a sleep never ends within
    the test.)"""
    from scripts.streams import wait_until

    views = SharedPages(pages=3, batch=10)
    sweeper = ExpirySweeper(
        HalfRecordedElsewhere(),  # type: ignore[arg-type]
        views,  # type: ignore[arg-type]
        clock=clock,
        batch=10,
        interval=3600.0,
    )
    sweeper.start()
    try:
        wait_until(lambda: views.served == 3, "the next pages swept at once", timeout=30)
        assert sweeper.recorded == 15
    finally:
        sweeper.stop()
