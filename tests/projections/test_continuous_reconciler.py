"""The continuous reconciler: a supervised service recording every run, report-only unless
told to repair, its run table bounded."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from daybook import Ledger, open_ledger, projections, run_projections
from daybook.infrastructure.bootstrap import event_log_of, open_event_log
from daybook.infrastructure.cli import main
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.readmodels import reconcile_log
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.reconciler import (
    KEPT_RUNS,
    RUNS_TABLE,
    ContinuousReconciler,
    last_runs,
    record_run,
)
from daybook.infrastructure.settings import Settings
from daybook.projections.accounts import ACCOUNT_BALANCES, BALANCES
from daybook.projections.model import LogEvent, Rows
from scripts.outage import Outage
from scripts.streams import wait_until
from tests.projections.helpers import assert_tables_match, workload

pytestmark = pytest.mark.postgres


@pytest.fixture
def ledger(pg_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(pg_url)
    yield ledger
    ledger.close()


def corrupt(url: str, account: object) -> None:
    store = open_store(url)
    store.execute(
        f"UPDATE {BALANCES.physical_name(1)} SET balance = balance + 7 WHERE account_id = %s",
        (str(account),),
    )
    store.close()


def test_it_reports_drift_without_repairing_by_default_and_repairs_when_told(
    ledger: Ledger, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = workload(ledger, 100)
    runner = run_projections(ledger, pg_url, start=False)
    runner.run_until_caught_up()
    runner.stop()
    corrupt(pg_url, ids[0])
    log = event_log_of(ledger)
    watcher = ContinuousReconciler(log, pg_url, projections.ALL, every_events=1, every_seconds=0)
    runs = {run.name: run for run in watcher.run_due()}
    assert set(runs) == {p.name for p in projections.ALL}
    balances = runs["account_balances"]
    assert balances.drifted == 1 and not balances.repaired
    assert str(ids[0]) in balances.drifts[0]
    assert all(run.drifted == 0 for name, run in runs.items() if name != "account_balances")
    capsys.readouterr()
    assert main(["projections", "status", "--url", pg_url]) == 1
    out = capsys.readouterr().out
    # status shows each version's last run: position, ranges, duration, drift with its
    # keys, and whether it was repaired.
    (line,) = [s for s in out.splitlines() if "reconciled at" in s and "drifted" in s]
    assert f"reconciled at position {balances.position} " in line
    assert (
        f"{balances.ranges_checked} ranges checked, {balances.ranges_differing} differing" in line
    )
    # (The duration as recorded, rounded on the way: not to be compared to the digit.)
    assert re.search(r", in \d+\.\d\ds\): ", line), line
    assert line.endswith(": 1 drifted rows, not repaired"), line
    assert str(ids[0]) in out
    with pytest.raises(AssertionError):
        assert_tables_match(ledger, pg_url, projections.ACCOUNT_BALANCES)  # left as found

    fixer = ContinuousReconciler(
        log, pg_url, [projections.ACCOUNT_BALANCES], every_events=1, every_seconds=0, repair=True
    )
    (run,) = fixer.run_due()
    assert run.drifted == 1 and run.repaired
    assert main(["projections", "status", "--url", pg_url]) == 0
    assert_tables_match(ledger, pg_url, projections.ACCOUNT_BALANCES)


def test_it_runs_as_a_service_and_its_runs_table_stays_bounded(ledger: Ledger, pg_url: str) -> None:
    workload(ledger, 60)
    runner = run_projections(ledger, pg_url, start=False)
    runner.run_until_caught_up()
    runner.stop()
    service = ContinuousReconciler(
        event_log_of(ledger), pg_url, [projections.ACCOUNT_BALANCES], every_events=1,
        every_seconds=0, poll_interval=0.01,
    )  # fmt: skip
    service.start()
    try:
        while service.runs < 3:
            service.service.stopping.wait(0.05)
        assert service.health().state is ServiceState.RUNNING
    finally:
        service.stop()
    assert service.health().state is ServiceState.STOPPED
    (last,) = service.run_due()
    store = open_store(pg_url)
    try:
        for _ in range(KEPT_RUNS + 5):
            record_run(store, last)
        (count,) = store.execute(f"SELECT count(*) FROM {RUNS_TABLE}")[0]
        assert count == KEPT_RUNS
    finally:
        store.close()


def test_the_log_of_repairs_keeps_the_newest_of_each_version(
    ledger: Ledger, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A projection that keeps drifting, under a continuous reconciler with repair on, adds
    its drifted rows to the log of repairs at every run: the log keeps the newest
    ``KEPT_REPAIRS`` of each version, as the runs table keeps the last runs."""
    monkeypatch.setattr(reconcile_log, "KEPT_REPAIRS", 5)
    ids = workload(ledger, 60)
    runner = run_projections(ledger, pg_url, start=False)
    runner.run_until_caught_up()
    runner.stop()
    fixer = ContinuousReconciler(
        event_log_of(ledger), pg_url, [projections.ACCOUNT_BALANCES], every_events=1,
        every_seconds=0, repair=True,
    )  # fmt: skip
    for round_number in range(4):
        for account in ids[:3]:
            corrupt(pg_url, account)
        (run,) = fixer.run_due()
        assert run.drifted == 3 and run.repaired, round_number
    store = open_store(pg_url)
    try:
        rows = store.execute("SELECT id, row_key FROM daybook_reconcile_log ORDER BY id")
    finally:
        store.close()
    assert len(rows) == 5
    assert [row[0] for row in rows] == list(range(12 - 4, 12 + 1)), "not the newest five"


def test_a_version_that_lags_the_head_is_reconciled_once_per_n_new_events(
    ledger: Ledger, pg_url: str
) -> None:
    """Its runner is down: the version stands 20 events behind the head. "Every 10 events"
    counts events written since the last run, not how far the version lags: without new
    events, polls run nothing (each run folds the log, logs a line and records a row)."""
    account = ledger.open_account("ann", "EUR").account_id
    runner = run_projections(ledger, pg_url, start=False)
    runner.run_until_caught_up()
    runner.stop()
    for _ in range(20):
        ledger.deposit(account, 1)
    watcher = ContinuousReconciler(
        event_log_of(ledger), pg_url, [projections.ACCOUNT_BALANCES], every_events=10,
        every_seconds=600,
    )  # fmt: skip
    assert len(watcher.run_due()) == 1
    assert watcher.run_due() == []
    assert watcher.run_due() == []
    for _ in range(10):
        ledger.deposit(account, 1)
    assert len(watcher.run_due()) == 1
    assert watcher.run_due() == []


def _refuse(event: LogEvent, rows: Rows) -> None:
    raise ValueError("this definition refuses every event")


def test_a_run_that_failed_waits_its_interval_whatever_the_log_does(
    ledger: Ledger, pg_url: str
) -> None:
    """The fold fails (a definition that refuses an event the served version has): the
    next try waits the interval in seconds, not the next event, or a busy log would fold
    and log an error at every poll."""
    account = ledger.open_account("ann", "EUR").account_id
    ledger.deposit(account, 5)
    runner = run_projections(ledger, pg_url, start=False)
    runner.run_until_caught_up()
    runner.stop()
    broken = replace(
        projections.ACCOUNT_BALANCES,
        handlers=dict.fromkeys(projections.ACCOUNT_BALANCES.handlers, _refuse),
    )
    watcher = ContinuousReconciler(
        event_log_of(ledger), pg_url, [broken], every_events=1, every_seconds=600
    )
    (failed,) = watcher.run_due()
    assert failed.error is not None and "refuses every event" in failed.error
    for _ in range(5):
        ledger.deposit(account, 1)
    assert watcher.run_due() == []


def test_it_waits_out_an_outage_of_its_databases_and_goes_on(
    ledger: Ledger, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The event store and the read models (one database) gone for a while under the
    running service: its runs fail, it retries, and it reconciles again once they are back;
    it never stops for good."""

    workload(ledger, 60)
    runner = run_projections(ledger, pg_url, start=False)
    runner.run_until_caught_up()
    runner.stop()
    with Outage.of_url(pg_url) as outage:
        log = open_event_log(settings=Settings(url=outage.url(pg_url)))
        service = ContinuousReconciler(
            log, outage.url(pg_url), [projections.ACCOUNT_BALANCES], every_events=1,
            every_seconds=0, poll_interval=0.01,
        )  # fmt: skip
        service.start()
        try:
            wait_until(lambda: service.runs >= 1, "a first run")
            caplog.set_level(logging.WARNING, logger="daybook")
            outage.cut()
            # Said once per failed attempt; its RETRYING state lasts only the backoff, which
            # a look at its health can miss.
            wait_until(
                lambda: any(
                    r.getMessage().startswith("continuous reconciler")
                    and "restarting in" in r.getMessage()
                    for r in caplog.records
                ),
                "the outage to be met",
            )
            outage.restore()
            runs = service.runs
            wait_until(lambda: service.runs > runs + 1, "runs after the outage")
            assert service.health().state is ServiceState.RUNNING, service.health()
        finally:
            service.stop()
            log.close()


def test_a_stop_asked_during_a_pass_starts_no_other_projection(
    ledger: Ledger, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop (SIGTERM) during the first projection's fold waited for a full fold of every
    other projection first: minutes on a long log, past any supervisor's stop limit."""
    from daybook.infrastructure.readmodels import reconciler as reconciler_module

    workload(ledger, 50)
    runner = run_projections(ledger, pg_url, start=False)
    runner.run_until_caught_up()
    runner.stop()
    service = ContinuousReconciler(
        event_log_of(ledger), pg_url, projections.ALL, every_events=1, every_seconds=0
    )
    real = reconciler_module.reconcile
    folded: list[str] = []

    def reconcile(*args: object, **kwargs: object) -> object:
        folded.append(args[2].name)  # type: ignore[attr-defined]
        if len(folded) == 1:  # what the signal handler does
            service.service.stopping.set()
            service.log.interrupt()
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reconciler_module, "reconcile", reconcile)
    health = service.run_forever()
    assert health.state is ServiceState.STOPPED
    assert len(folded) == 1, f"the pass went on to fold {folded[1:]}"


def test_a_stop_asked_during_a_fold_ends_the_fold(
    ledger: Ledger, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fold of a long log takes minutes (account_statement over months of events): a
    stop (SIGTERM) asked during it waited for all of it, past any supervisor's stop limit
    (which then kills the process, its scratch files left behind on SQLite). It ends at the
    fold's next batch, and no run is recorded for a fold it cut short."""
    from daybook.infrastructure.readmodels import reconcile as reconcile_module

    workload(ledger, 50)
    runner = run_projections(ledger, pg_url, start=False)
    runner.run_until_caught_up()
    runner.stop()
    monkeypatch.setattr(reconcile_module, "FOLD_BATCH", 5)  # many batches
    service = ContinuousReconciler(
        event_log_of(ledger), pg_url, [ACCOUNT_BALANCES], every_events=1, every_seconds=0
    )
    scans: list[int] = []
    scan = service.log.scan

    def scanned(start: int, limit: int) -> Any:
        scans.append(start)
        if len(scans) == 2:  # what the signal handler does, in the fold
            service.service.stopping.set()
            service.log.interrupt()
        return scan(start, limit)

    monkeypatch.setattr(service.log, "scan", scanned)
    health = service.run_forever()
    assert health.state is ServiceState.STOPPED
    assert len(scans) <= 3, f"the fold went on for {len(scans) - 2} batches after the stop"
    assert service.runs == 0
    store = open_store(pg_url)
    try:
        assert (ACCOUNT_BALANCES.name, ACCOUNT_BALANCES.version) not in last_runs(store)
    finally:
        store.close()
