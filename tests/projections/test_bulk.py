"""The bulk runner (rebuilds, long catch-ups) on every backend: the same tables as a replay and
as the live runner, and the same handling of bad events, through its fast path."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from daybook import Ledger, open_ledger, projections
from daybook.domain.events import LedgerAggregate
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.readmodels.bulk import BulkRunner
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionState
from daybook.infrastructure.readmodels.dead_letters import DeadLetters
from daybook.infrastructure.readmodels.location import ReadModelLocation, open_store
from daybook.infrastructure.readmodels.rebuild import rebuild
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.projections.accounts import ACCOUNT_BALANCES, BALANCES, DEPOSITED
from daybook.projections.model import LogEvent, Projection, Rows
from tests.projections.helpers import assert_tables_match, stored_rows, workload


@pytest.fixture
def ledger(store_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(store_url)
    yield ledger
    ledger.close()


@pytest.fixture
def url(store_url: str) -> Iterator[str]:
    with ReadModelLocation(store_url) as location:
        yield location.url


def test_bulk_batches_build_every_projection_like_a_replay(ledger: Ledger, url: str) -> None:
    ids = workload(ledger, 200)
    seen: list[int] = []
    runner = BulkRunner(
        event_log_of(ledger),
        url,
        projections.ALL,
        batch_size=37,
        on_progress=lambda p: seen.append(p.events),
    )
    runner.run_until_caught_up()
    runner.stop()
    assert sum(seen) == ledger.head() and max(seen) == 37
    for projection in projections.ALL:
        assert_tables_match(ledger, url, projection)
    # Resumed over committed tables: the caches are warmed from them, rows only change.
    workload(ledger, 80, seed=3, accounts=ids)
    again = BulkRunner(event_log_of(ledger), url, projections.ALL, batch_size=50)
    again.run_until_caught_up()
    again.stop()
    for projection in projections.ALL:
        assert_tables_match(ledger, url, projection)


def test_bulk_and_live_runners_write_identical_tables(
    ledger: Ledger, url: str, tmp_path: object
) -> None:
    workload(ledger, 150, seed=7)
    other = f"sqlite:///{tmp_path}/live.db"
    for runner in (
        BulkRunner(event_log_of(ledger), url, projections.ALL, batch_size=64),
        ProjectionRunner(event_log_of(ledger), other, projections.ALL, batch_size=64),
    ):
        runner.run_until_caught_up()
        runner.stop()
    for projection in projections.ALL:
        assert stored_rows(url, projection) == stored_rows(other, projection)


def test_projections_at_different_positions_each_get_only_their_events(
    ledger: Ledger, url: str
) -> None:
    ids = workload(ledger, 100)
    ahead = ProjectionRunner(event_log_of(ledger), url, [ACCOUNT_BALANCES], batch_size=25)
    ahead.run_until_caught_up()
    ahead.stop()
    workload(ledger, 60, seed=4, accounts=ids)
    runner = BulkRunner(event_log_of(ledger), url, projections.ALL, batch_size=1000)
    runner.run_until_caught_up()
    runner.stop()
    for projection in projections.ALL:
        assert_tables_match(ledger, url, projection)


def test_a_tracking_row_changed_under_a_batch_in_flight_restarts_from_the_commit(
    ledger: Ledger, url: str
) -> None:
    workload(ledger, 150)
    runner = BulkRunner(event_log_of(ledger), url, projections.ALL, batch_size=30)
    runner.step()
    flight = runner._flight
    assert flight is not None
    flight.future.result()  # committed; the next batch is computed on top of it
    store = open_store(url)
    VersionCatalog(store).bump_epoch("account_balances", 1)  # as a repair does
    store.close()
    runner.step()  # its write finds the epoch moved and rolls back
    runner.step()  # which this step learns: it lets everything go, to claim it again
    assert not runner.slots
    runner.run_until_caught_up()
    runner.stop()
    for projection in projections.ALL:
        assert_tables_match(ledger, url, projection)


def _poisoned(amount: int = 13) -> tuple[Projection, list[int]]:
    """account_balances whose deposit handler fails on deposits of ``amount``."""
    calls: list[int] = []
    good = ACCOUNT_BALANCES.handlers[DEPOSITED]

    def deposit(event: LogEvent, rows: Rows) -> None:
        if event.data["amount"] == amount:
            calls.append(event.position)
            good(event, rows)  # a partial change, which must be undone
            raise ValueError(f"cannot apply deposit at {event.position}")
        good(event, rows)

    handlers = {**ACCOUNT_BALANCES.handlers, DEPOSITED: deposit}
    return Projection(ACCOUNT_BALANCES.name, 1, ACCOUNT_BALANCES.tables, handlers), calls


def _wide(amount: int = 13) -> Projection:
    """account_balances whose deposit handler puts a row with an extra column."""
    good = ACCOUNT_BALANCES.handlers[DEPOSITED]

    def deposit(event: LogEvent, rows: Rows) -> None:
        if event.data["amount"] != amount:
            good(event, rows)
            return
        row = rows.get(BALANCES.name, (event.originator_id,))
        assert row is not None
        rows.put(BALANCES.name, {**row, "surprise": 1})

    handlers = {**ACCOUNT_BALANCES.handlers, DEPOSITED: deposit}
    return Projection(ACCOUNT_BALANCES.name, 1, ACCOUNT_BALANCES.tables, handlers)


@pytest.mark.parametrize("bad", ["raises", "wrong columns"])
def test_a_bad_event_is_parked_exactly_as_the_live_runner_parks_it(
    ledger: Ledger, url: str, bad: str
) -> None:
    projection = _poisoned()[0] if bad == "raises" else _wide()
    account = ledger.open_account("ann", "EUR").account_id
    ledger.deposit(account, 5)
    bad_position = ledger.deposit(account, 13).position
    ledger.deposit(account, 7)
    defs = [projection, projections.ACCOUNT_STATEMENT]
    runner = BulkRunner(event_log_of(ledger), url, defs, max_attempts=3, retry_backoff=0.001)
    for _ in range(6):
        runner.step()
    runner.stop()
    store = open_store(url)
    try:
        (letter,) = DeadLetters(store).entries("account_balances")
        assert letter.position == bad_position and letter.attempts == 3
        catalog = VersionCatalog(store)
        record = catalog.version("account_balances", 1)
        assert record is not None and record.state is VersionState.STOPPED
        assert record.position == bad_position - 1  # everything before it, nothing after
        balance = store.fetch(BALANCES, 1, (str(account),))
        assert balance is not None and balance["balance"] == 5
        statement = catalog.version("account_statement", 1)
        assert statement is not None and statement.position == ledger.head()
    finally:
        store.close()
    assert_tables_match(ledger, url, projections.ACCOUNT_STATEMENT)


def test_the_bulk_path_leaves_the_garbage_collector_alone(ledger: Ledger, url: str) -> None:
    # Pausing it is process-wide; only the rebuild command may choose to (see its CLI).
    good = ACCOUNT_BALANCES.handlers[DEPOSITED]
    collecting: list[bool] = []

    def deposit(event: LogEvent, rows: Rows) -> None:
        collecting.append(gc.isenabled())
        good(event, rows)

    handlers = {**ACCOUNT_BALANCES.handlers, DEPOSITED: deposit}
    watched = Projection(ACCOUNT_BALANCES.name, 1, ACCOUNT_BALANCES.tables, handlers)
    workload(ledger, 60)
    runner = BulkRunner(event_log_of(ledger), url, [watched], batch_size=1000)
    runner.run_until_caught_up()
    runner.stop()
    assert collecting and all(collecting)
    assert_tables_match(ledger, url, ACCOUNT_BALANCES)


def test_a_rebuild_serves_tables_identical_to_the_live_runners(
    store_url: str, url: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Transfers, holds (captured, voided, left open), stock and reservations, over several
    # days; rebuilt in bulk (every table's key built at the switch) and kept by the live
    # runner elsewhere: every table's checksums, and rows, are the same.
    day = [datetime(2030, 1, 1, tzinfo=UTC)]
    ticks = itertools.count()
    monkeypatch.setattr(  # events' times, a microsecond apart, on the day in hand
        LedgerAggregate.Event,
        "create_timestamp",
        staticmethod(lambda: day[0] + timedelta(microseconds=next(ticks))),
    )
    ledger = open_ledger(store_url, clock=lambda: day[0])
    try:
        ids = workload(ledger, 60)
        for step in range(4):
            workload(ledger, 40, seed=step + 2, accounts=ids)
            euros = [ids[1], ids[2], ids[4], ids[5]]  # workload's accounts in EUR
            a, b = euros[step], euros[(step + 1) % 4]
            ledger.deposit(a, 1_000)
            kept = ledger.hold(a, 30, destination=b, timeout=7 * 86_400).hold_id
            captured = ledger.hold(a, 20, destination=b, timeout=3_600).hold_id
            voided = ledger.hold(a, 10, timeout=3_600).hold_id
            assert kept is not None and captured is not None and voided is not None
            ledger.capture(captured)
            ledger.void(voided)
            day[0] += timedelta(days=1)
        log = event_log_of(ledger)
        for projection in projections.ALL:
            rebuild(log, url, projection, batch_size=64, progress=False)
        other = f"sqlite:///{tmp_path}/live.db"
        live = ProjectionRunner(event_log_of(ledger), other, projections.ALL, batch_size=64)
        live.run_until_caught_up()
        live.stop()
    finally:
        ledger.close()
    rebuilt, kept_live = open_store(url), open_store(other)
    try:
        for projection in projections.ALL:
            record = VersionCatalog(rebuilt).version(projection.name, projection.version)
            assert record is not None and record.state is VersionState.LIVE
            for table in projection.tables:
                sums = rebuilt.range_checksums(table, projection.version)
                assert sums == kept_live.range_checksums(table, projection.version), table.name
    finally:
        rebuilt.close()
        kept_live.close()
    daily = stored_rows(url, projections.DAILY_ACTIVITY)
    assert len({row["day"] for row in daily["daily_money"]}) == 4 and daily["daily_stock"]
    assert len(stored_rows(url, projections.OPEN_HOLDS_PROJECTION)["open_holds"]) == 4
    for projection in projections.ALL:
        assert stored_rows(url, projection) == stored_rows(other, projection)
