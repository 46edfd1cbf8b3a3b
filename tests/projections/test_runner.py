"""The in-process runner on every backend: exactly-once batches, queries, poison events."""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from daybook import Ledger, open_ledger, projections, run_projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.cli import main
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.observability import metrics
from daybook.infrastructure.observability.logs import RateLimit
from daybook.infrastructure.readmodels import StaleRead
from daybook.infrastructure.readmodels.bulk import BulkRunner
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionState
from daybook.infrastructure.readmodels.dead_letters import DeadLetters
from daybook.infrastructure.readmodels.location import ReadModelLocation, open_store
from daybook.infrastructure.readmodels.reconcile import reconcile
from daybook.infrastructure.readmodels.status import projection_status
from daybook.infrastructure.readmodels.store import ReadStore, ReadStoreError
from daybook.projections.accounts import ACCOUNT_BALANCES, BALANCES, DEPOSITED
from daybook.projections.inventory import INVENTORY_LEVELS
from daybook.projections.model import LogEvent, Projection, Rows
from tests.projections.helpers import assert_tables_match, workload


@pytest.fixture
def ledger(store_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(store_url)
    yield ledger
    ledger.close()


@pytest.fixture
def url(store_url: str) -> Iterator[str]:
    """Read models that outlive a runner (a scratch database for a memory:// ledger)."""
    with ReadModelLocation(store_url) as location:
        yield location.url


def test_runner_builds_every_projection_like_a_replay(ledger: Ledger, url: str) -> None:
    workload(ledger, 150)
    with run_projections(ledger, url, batch_size=37, poll_interval=0.01) as runner:
        receipt = ledger.deposit(ledger.open_account("late", "EUR").account_id, 5)
        runner.views.balance(receipt.account_id or "", min_position=receipt.position, timeout=30)
        for name in ("account_statement", "inventory_levels", "daily_activity"):
            _wait_position(runner.views, name, receipt.position)
    for projection in projections.ALL:
        assert_tables_match(ledger, runner.url, projection)


def test_available_funds_past_a_bigint_stop_no_read_model(ledger: Ledger, url: str) -> None:
    """Balance plus overdraft limit may pass 2**63-1 (a credit line of 2**63-1 and a
    deposit): the row shows 2**63-1 available, rather than stopping the balances of every
    account for good, as it did."""
    rich = ledger.open_account("credit line", "EUR", overdraft_limit=2**63 - 1).account_id
    other = ledger.open_account("bystander", "EUR").account_id
    assert rich is not None and other is not None
    ledger.deposit(rich, 1)
    ledger.deposit(other, 5)
    with run_projections(ledger, url, poll_interval=0.01) as runner:
        balance = runner.views.balance(other, min_position=ledger.head(), timeout=30)
        assert balance is not None and balance.balance == 5
        rich_row = runner.views.balance(rich, min_position=ledger.head())
        assert (rich_row.balance, rich_row.available) == (1, 2**63 - 1)
        assert runner.versions_health().state is ServiceState.RUNNING


def test_a_days_volume_past_a_bigint_is_kept_exactly(ledger: Ledger, url: str) -> None:
    """Each amount fits 64 bits, a day's total need not: three deposits of 2**62 make a
    volume of 3 * 2**62, which stopped daily_activity for every day and currency, as did
    a day's reserved units past 2**63-1. Totals are kept exactly, by a bulk build and by
    the live runner going on from it."""
    accounts = [ledger.open_account(f"whale {n}", "EUR").account_id or "" for n in range(3)]
    for account in accounts[:2]:
        ledger.deposit(account, 2**62)
    ledger.receive_stock("SKU-BIG", 2**63 - 1)
    ledger.reserve_stock("SKU-BIG", 2**63 - 1, reservation_id="all")
    ledger.release_reservation("SKU-BIG", "all")
    bulk = BulkRunner(event_log_of(ledger), url, [projections.DAILY_ACTIVITY])
    bulk.run_until_caught_up()
    bulk.stop()
    assert_tables_match(ledger, url, projections.DAILY_ACTIVITY)

    ledger.deposit(accounts[2], 2**62)
    ledger.reserve_stock("SKU-BIG", 2**63 - 1, reservation_id="again")
    today = datetime.now(UTC).date()
    with run_projections(ledger, url, poll_interval=0.01) as runner:
        activity = runner.views.daily_activity(
            days=2, today=today, min_position=ledger.head(), timeout=30
        )
        assert runner.versions_health().state is ServiceState.RUNNING
    (day,) = activity.days
    assert day.money["EUR"]["deposits"] == 3
    assert day.money["EUR"]["deposit_volume"] == 3 * 2**62
    assert (day.reserved, day.released) == (2 * (2**63 - 1), 2**63 - 1)
    assert_tables_match(ledger, url, projections.DAILY_ACTIVITY)
    report = reconcile(event_log_of(ledger), url, projections.DAILY_ACTIVITY)
    assert report.clean, [drift.describe() for drift in report.drifts]


def test_a_version_built_from_the_start_does_not_hold_up_the_versions_that_serve(
    tmp_path: Path,
) -> None:
    """A runner given a new projection (or a new version) builds it from the start of the
    log. Every batch was read from where that one was, so the versions serving reads skipped
    everything they had applied and took no new event until the new one had read the whole
    log: reads with a ``min_position`` ended in ``stale_read`` meanwhile. Every other batch
    is now theirs; the new one is still built exactly."""
    url = f"sqlite:///{tmp_path}/daybook.db"
    with open_ledger(url) as ledger:
        ids = workload(ledger, 600)
        with run_projections(ledger, url, start=False) as first:
            first.run_until_caught_up()
        receipt = ledger.deposit(ids[0], 7)
        extra = Projection("stock_copy", 1, INVENTORY_LEVELS.tables, INVENTORY_LEVELS.handlers)
        every = [*projections.ALL, extra]
        with run_projections(ledger, url, projections=every, start=False, batch_size=100) as runner:
            runner.step()
            runner.step()
            balance = runner.views.balance(ids[0], min_position=receipt.position, timeout=0)
            assert balance is not None and balance.as_of_position >= receipt.position
            with pytest.raises(StaleRead):  # the new one has read only a batch of the log
                runner.views.row(extra, "inventory_levels", ("none",), min_position=100, timeout=0)
            runner.run_until_caught_up()
            assert (
                runner.views.row(
                    extra, "inventory_levels", ("none",), min_position=receipt.position, timeout=0
                ).value
                is None
            )
        assert_tables_match(ledger, url, extra)
        for projection in projections.ALL:
            assert_tables_match(ledger, url, projection)


def test_versions_serving_reads_report_their_own_lag_while_one_is_built(
    tmp_path: Path,
) -> None:
    """A version at the head, while the runner builds another from the start of the log,
    reported as lag what the new one had yet to read (the batch read for the new one said
    nothing about it)."""
    url = f"sqlite:///{tmp_path}/daybook.db"
    with open_ledger(url) as ledger:
        workload(ledger, 600)
        with run_projections(ledger, url, start=False) as first:
            first.run_until_caught_up()
        head = ledger.head()
        extra = Projection("stock_copy", 1, INVENTORY_LEVELS.tables, INVENTORY_LEVELS.handlers)
        every = [*projections.ALL, extra]
        with run_projections(ledger, url, projections=every, start=False, batch_size=100) as runner:
            for _ in range(3):
                runner.step()
            key = ("account_balances", ACCOUNT_BALANCES.version)
            assert runner.slots[key].record.position == head
            labels = {"projection": key[0], "version": str(key[1])}
            lag = [
                metrics.REGISTRY.get_sample_value(f"daybook_projection_lag_{unit}", labels)
                for unit in ("events", "seconds")
            ]
            assert lag == [0, 0]


def test_a_serving_version_more_than_a_batch_behind_the_others_is_not_left_waiting(
    tmp_path: Path,
) -> None:
    """Three groups of versions: a new one at the start of the log, daily_activity a few
    batches behind, the others at the head. Only the new one and those within a batch of
    the furthest ahead took turns: daily_activity waited for the new one to reach it."""
    url = f"sqlite:///{tmp_path}/daybook.db"
    with open_ledger(url) as ledger:
        ids = workload(ledger, 300)
        with run_projections(ledger, url, start=False) as first:
            first.run_until_caught_up()
        behind = ledger.head()
        workload(ledger, 300, seed=2, accounts=ids)
        others = [p for p in projections.ALL if p is not projections.DAILY_ACTIVITY]
        with run_projections(ledger, url, projections=others, start=False) as second:
            second.run_until_caught_up()
        extra = Projection("stock_copy", 1, INVENTORY_LEVELS.tables, INVENTORY_LEVELS.handlers)
        every = [*projections.ALL, extra]
        with run_projections(ledger, url, projections=every, start=False, batch_size=100) as runner:
            for _ in range(3):
                runner.step()
            activity = runner.slots[("daily_activity", projections.DAILY_ACTIVITY.version)]
            assert activity.record.position > behind
            runner.run_until_caught_up()
        for projection in every:
            assert_tables_match(ledger, url, projection)


def _wait_position(views: Any, name: str, position: int) -> None:
    views._read_at(name, lambda store, version: None, position, 30.0)


def test_stopping_and_restarting_applies_each_event_exactly_once(ledger: Ledger, url: str) -> None:
    ids = workload(ledger, 80)
    runner = run_projections(ledger, url, batch_size=7, poll_interval=0.01, start=False)
    runner.step()
    runner.step()  # two batches committed, then the runner "dies"
    runner.stop()
    workload(ledger, 80, seed=2, accounts=ids)
    again = run_projections(ledger, runner.url, batch_size=7, poll_interval=0.01, start=False)
    again.run_until_caught_up()
    again.stop()
    for projection in projections.ALL:
        assert_tables_match(ledger, runner.url, projection)


def test_a_runner_asked_not_to_start_stays_in_its_callers_hands_inside_with(
    ledger: Ledger, url: str
) -> None:
    """``start=False`` holds in a ``with`` block too: the caller steps the runner itself,
    and no thread of its own applies batches meanwhile (``with`` used to start one)."""
    workload(ledger, 20)
    with run_projections(ledger, url, batch_size=5, start=False) as runner:
        assert runner.health().state is not ServiceState.RUNNING
        runner.step()
        assert runner.health().state is not ServiceState.RUNNING
        runner.run_until_caught_up()
    for projection in projections.ALL:
        assert_tables_match(ledger, runner.url, projection)


def test_the_row_cache_keeps_no_rows_of_resolved_holds(ledger: Ledger, url: str) -> None:
    """A table the runner holds whole needs no mark for a deleted row (a miss already says
    absent): kept, the keys of every hold and reservation ever resolved filled the cache
    until it was cleared, and its tables were no longer held whole."""
    payer = ledger.open_account("payer", "EUR").account_id
    assert payer is not None
    ledger.deposit(payer, 1_000)
    ledger.receive_stock("KETTLE", 100)
    runner = run_projections(
        ledger, url, projections=[projections.OPEN_HOLDS_PROJECTION], start=False
    )

    def resolve_one_of_each() -> None:
        hold_id = ledger.hold(payer, 10, timeout=3600).hold_id
        assert hold_id is not None
        ledger.void(hold_id)
        reservation_id = ledger.reserve_stock("KETTLE", 1, timeout=3600).reservation_id
        assert reservation_id is not None
        ledger.release_reservation("KETTLE", reservation_id)
        while runner.step():
            pass

    resolve_one_of_each()
    (slot,) = runner.slots.values()
    kept = slot.cache.size()
    for _ in range(20):
        resolve_one_of_each()
    assert slot.cache.size() == kept
    assert all(slot.cache.complete.values())
    runner.stop()


def test_read_your_writes_and_honest_staleness(ledger: Ledger, url: str) -> None:
    account = ledger.open_account("ann", "EUR").account_id
    with run_projections(ledger, url, poll_interval=0.01) as runner:
        receipt = ledger.deposit(account, 700)
        row = runner.views.balance(account, min_position=receipt.position, timeout=30)
        assert row is not None
        assert row.balance == 700
        assert row.as_of_position >= receipt.position
        assert row.lag_events is not None and row.lag_events >= 0
    # The runner is stopped: a newer write cannot become visible, and the read says so.
    later = ledger.deposit(account, 1)
    with pytest.raises(StaleRead) as caught:
        runner.views.balance(account, min_position=later.position, timeout=0.05)
    assert caught.value.code == "stale_read"
    assert caught.value.wanted == later.position
    assert caught.value.reached == row.as_of_position
    assert str(later.position) in str(caught.value)
    stale = runner.views.balance(account)
    assert stale is not None and stale.balance == 700 and stale.lag_events == 1


def _poisoned(fail_times: int | None, amount: int = 13) -> tuple[Projection, list[int]]:
    """account_balances whose deposit handler fails on deposits of ``amount``."""
    calls: list[int] = []
    good = ACCOUNT_BALANCES.handlers[DEPOSITED]

    def deposit(event: LogEvent, rows: Rows) -> None:
        if event.data["amount"] == amount:
            calls.append(event.position)
            if fail_times is None or len(calls) <= fail_times:
                good(event, rows)  # a partial change, which must be undone
                raise ValueError(f"cannot apply deposit at {event.position}")
        good(event, rows)

    handlers = {**ACCOUNT_BALANCES.handlers, DEPOSITED: deposit}
    return Projection(ACCOUNT_BALANCES.name, 1, ACCOUNT_BALANCES.tables, handlers), calls


def test_a_poison_event_is_retried_then_parked_and_the_projection_stops(
    ledger: Ledger, url: str
) -> None:
    poisoned, calls = _poisoned(fail_times=None)
    account = ledger.open_account("ann", "EUR").account_id
    ledger.deposit(account, 5)
    bad = ledger.deposit(account, 13)
    ledger.deposit(account, 7)
    defs = [poisoned, projections.ACCOUNT_STATEMENT]
    runner = run_projections(
        ledger, url, projections=defs, start=False, max_attempts=3, retry_backoff=0.001
    )
    for _ in range(6):
        runner.step()
    runner.stop()
    assert calls == [bad.position] * 3
    store = open_store(runner.url)
    try:
        (letter,) = DeadLetters(store).entries("account_balances")
        assert letter.position == bad.position
        assert letter.attempts == 3
        assert "cannot apply deposit" in letter.error
        catalog = VersionCatalog(store)
        record = catalog.version("account_balances", 1)
        assert record is not None
        assert record.state is VersionState.STOPPED
        assert record.position == bad.position - 1  # everything before it, nothing after
        balance = store.fetch(ACCOUNT_BALANCES.tables[0], 1, (str(account),))
        assert balance is not None and balance["balance"] == 5
        statement = catalog.version("account_statement", 1)
        assert statement is not None and statement.position == ledger.head()
    finally:
        store.close()
    status = {s.name: s for s in projection_status(event_log_of(ledger), runner.url)}
    assert status["account_balances"].state is VersionState.STOPPED
    assert status["account_balances"].dead_letters == 1
    assert status["account_balances"].lag_events == 2
    assert status["account_statement"].state is VersionState.LIVE
    # The runner ran on for the others, and said it ran; /health said ok while a read model
    # stood still for good. Its versions' health says which one and why, and so does that
    # of a runner started again on the same code.
    assert runner.health().ok
    halted = runner.versions_health()
    assert halted.state is ServiceState.FAILED and not halted.ok
    assert halted.error is not None
    assert halted.error.startswith(
        f"account_balances v1 stopped: event Account.Deposited at position {bad.position}"
        " failed 3 times"
    )
    assert halted.error.endswith("once fixed: daybook projections resume account_balances")
    again = run_projections(ledger, url, projections=defs, start=False)
    again.run_until_caught_up()
    again.stop()
    assert again.versions_health().error == halted.error

    # Fixed and resumed: the parked event is applied, once.
    store = open_store(runner.url)
    VersionCatalog(store).resume("account_balances", 1)
    store.close()
    fixed = run_projections(ledger, runner.url, start=False)
    fixed.run_until_caught_up()
    fixed.stop()
    assert fixed.versions_health().ok
    assert_tables_match(ledger, runner.url, ACCOUNT_BALANCES)
    status = {s.name: s for s in projection_status(event_log_of(ledger), runner.url)}
    assert status["account_balances"].state is VersionState.LIVE
    assert status["account_balances"].dead_letters == 0  # resolved: kept, not counted


def test_each_version_that_parks_an_event_and_stops_says_so_in_the_log(
    ledger: Ledger, url: str
) -> None:
    """One event that two versions cannot apply stops both. Their lines (failed on the
    event, parked it and stopped, stopped) were rate-limited by their template alone: the
    second version's were held back by the first's, and the log named only one of the two
    stopped versions."""
    balances, _ = _poisoned(fail_times=None)
    good = projections.ACCOUNT_STATEMENT.handlers[DEPOSITED]

    def deposit(event: LogEvent, rows: Rows) -> None:
        if event.data["amount"] == 13:
            raise ValueError(f"cannot apply deposit at {event.position}")
        good(event, rows)

    statement = replace(
        projections.ACCOUNT_STATEMENT,
        handlers={**projections.ACCOUNT_STATEMENT.handlers, DEPOSITED: deposit},
    )
    account = ledger.open_account("ann", "EUR").account_id
    ledger.deposit(account, 13)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RateLimit(interval=3600))
    logger = logging.getLogger("daybook")
    logger.addHandler(handler)
    defs = [balances, statement]
    runner = run_projections(
        ledger, url, projections=defs, start=False, max_attempts=2, retry_backoff=0.001
    )
    try:
        for _ in range(4):
            runner.step()
    finally:
        runner.stop()
        logger.removeHandler(handler)
    assert set(runner.halted) == {(d.name, d.version) for d in defs}
    lines = stream.getvalue().splitlines()
    for d in defs:
        said = [line for line in lines if line.startswith(f"projection {d.name} v{d.version} ")]
        assert any("failed on event" in line for line in said), lines
        assert any("parked event" in line and "and stopped" in line for line in said), lines
        assert any(line.startswith(f"projection {d.name} v1 stopped: ") for line in said), lines


def table_exists(store: ReadStore, name: str) -> bool:
    try:
        store.execute(f"SELECT 1 FROM {name} LIMIT 1")
    except Exception as error:
        if store.is_missing_table(error):
            return False
        raise
    return True


def test_a_version_that_stopped_without_serving_goes_when_a_newer_one_serves(
    ledger: Ledger, url: str
) -> None:
    """Version 2 stops on an event its handler cannot apply; the fix ships as version 3,
    which builds and serves. Version 2 can never serve now (an older version than the one
    serving is never registered again): it is retired with version 1, and its tables,
    as large as the projection, are dropped rather than kept for good."""
    account = ledger.open_account("ann", "EUR").account_id
    for amount in (5, 13, 7):
        ledger.deposit(account, amount)

    def build(projection: Projection) -> None:
        runner = run_projections(
            ledger, url, projections=[projection], start=False, max_attempts=2,
            retry_backoff=0.001,
        )  # fmt: skip
        for _ in range(6):
            runner.step()
        runner.stop()

    poisoned, _ = _poisoned(fail_times=None)
    build(ACCOUNT_BALANCES)
    build(replace(poisoned, version=2))
    build(replace(ACCOUNT_BALANCES, version=3))
    store = open_store(url)
    try:
        catalog = VersionCatalog(store)
        states = {r.version: r.state for r in catalog.versions("account_balances")}
        assert states == {
            1: VersionState.RETIRED,
            2: VersionState.RETIRED,
            3: VersionState.LIVE,
        }
        assert catalog.active_version("account_balances") == 3
        for version in (1, 2):
            table = ACCOUNT_BALANCES.tables[0].physical_name(version)
            assert not table_exists(store, table), f"version {version}'s table was kept"
    finally:
        store.close()
    assert_tables_match(ledger, url, replace(ACCOUNT_BALANCES, version=3))


def test_a_transient_failure_is_retried_without_parking(ledger: Ledger, url: str) -> None:
    flaky, calls = _poisoned(fail_times=2)
    account = ledger.open_account("ann", "EUR").account_id
    ledger.deposit(account, 13)
    runner = run_projections(
        ledger, url, projections=[flaky], start=False, max_attempts=5, retry_backoff=0.001
    )
    for _ in range(5):
        runner.step()
    runner.stop()
    assert len(calls) == 3
    store = open_store(runner.url)
    try:
        assert DeadLetters(store).entries() == []
    finally:
        store.close()
    assert_tables_match(ledger, runner.url, ACCOUNT_BALANCES)


def test_a_memory_ledgers_scratch_read_models_are_removed_when_the_runner_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where temporary files go
    ledger = open_ledger("memory://")
    try:
        account = ledger.open_account("ann", "EUR").account_id
        receipt = ledger.deposit(account, 5)
        with run_projections(ledger, poll_interval=0.01) as runner:
            row = runner.views.balance(account, min_position=receipt.position, timeout=30)
            assert row is not None and row.balance == 5
            assert list(tmp_path.iterdir()) == [runner.location.scratch]
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(ReadStoreError):
            runner.views.balance(account)  # it would make the database again, empty
        assert list(tmp_path.iterdir()) == []
    finally:
        ledger.close()


def test_commands_refuse_a_memory_ledger_and_leave_no_files_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A command in a process of its own would only ever see an empty ledger of its own.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["projections", "status", "--url", "memory://"]) == 2
    assert main(["reconcile", "--url", "memory://"]) == 2
    assert "memory:// lives inside one process" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_runner_that_cannot_go_on_stops_with_its_reason(tmp_path: Path) -> None:
    target = tmp_path / "not-a-database.db"
    target.write_text("this file is not a database")
    with open_ledger(f"sqlite:///{tmp_path}/events.db") as ledger:
        ledger.open_account("ann", "EUR")
        runner = run_projections(ledger, f"sqlite:///{target}", poll_interval=0.01)
        runner.service.join(60)
        health = runner.health()
        runner.stop()
    assert health.state is ServiceState.FAILED
    assert runner.error is not None and "not a SQLite database" in runner.error


def _bad_key_reader() -> Projection:
    good = ACCOUNT_BALANCES.handlers[DEPOSITED]

    def deposit(event: LogEvent, rows: Rows) -> None:
        if event.data["amount"] == 13:
            # A handler bug on one kind of event: a key of the wrong shape. The driver
            # refuses it before anything is sent; the transaction is untouched.
            rows.get(BALANCES.name, (str(event.originator_id), "extra"))
        good(event, rows)

    handlers = {**ACCOUNT_BALANCES.handlers, DEPOSITED: deposit}
    return Projection(ACCOUNT_BALANCES.name, 1, ACCOUNT_BALANCES.tables, handlers)


def test_a_handler_bug_in_a_read_parks_the_event_and_the_others_go_on(
    ledger: Ledger, url: str
) -> None:
    """A read the driver refuses (a key of the wrong shape, a handler bug) is the event's
    failure, parked, while the other projections go on; only a read a retry may cure
    fails the batch (see ``StoreFailed``). A first cut of that stopped every version."""
    account = ledger.open_account("ann", "EUR").account_id
    ledger.deposit(account, 5)
    defs = [_bad_key_reader(), projections.ACCOUNT_STATEMENT]
    runner = run_projections(
        ledger,
        url,
        projections=defs,
        start=False,
        max_attempts=3,
        retry_backoff=0.001,
        cache_limit=0,
    )
    try:
        runner.step()  # rows exist: the cache no longer holds the tables whole
        bad = ledger.deposit(account, 13)
        ledger.deposit(account, 7)
        for _ in range(6):
            runner.step()
    finally:
        runner.stop()
    store = open_store(runner.url)
    try:
        (letter,) = DeadLetters(store).entries("account_balances")
        assert letter.position == bad.position
        catalog = VersionCatalog(store)
        record = catalog.version("account_balances", 1)
        assert record is not None and record.state is VersionState.STOPPED
        statement = catalog.version("account_statement", 1)
        assert statement is not None and statement.position == ledger.head()
    finally:
        store.close()
