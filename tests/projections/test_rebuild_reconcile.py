"""Blue/green rebuilds after a schema change, and the reconciler finding and fixing drift."""

from __future__ import annotations

import argparse
import gc
import io
import logging
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from daybook import Ledger, open_ledger, projections, run_projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.cli import build_parser, main
from daybook.infrastructure.observability import metrics
from daybook.infrastructure.readmodels import rebuild_jobs
from daybook.infrastructure.readmodels import reconcile as reconcile_module
from daybook.infrastructure.readmodels import reconciler as reconciler_module
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionState
from daybook.infrastructure.readmodels.dead_letters import DeadLetters
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.rebuild import RebuildResult, rebuild
from daybook.infrastructure.readmodels.reconcile import reconcile
from daybook.infrastructure.readmodels.reconciler import ContinuousReconciler, last_runs
from daybook.projections.accounts import ACCOUNT_BALANCES, BALANCES, DEPOSITED, STATEMENT
from daybook.projections.activity import DAILY_ACTIVITY, MONEY
from daybook.projections.model import Column, LogEvent, Projection, Rows, Table
from tests.projections.helpers import assert_tables_match, workload

#: Version 2 of account_balances: a new column counting deposits.
BALANCES_V2 = Table(BALANCES.name, (*BALANCES.columns, Column("deposits", "bigint")), BALANCES.key)


def _v2_handler(name: str):  # type: ignore[no-untyped-def]
    old = ACCOUNT_BALANCES.handlers[name]

    def handle(event: LogEvent, rows: Rows) -> None:
        before = rows.get(BALANCES.name, (event.originator_id,))
        deposits = int(before.get("deposits") or 0) if before else 0

        class Shim:
            def get(self, table: str, key: tuple[object, ...]):  # type: ignore[no-untyped-def]
                row = rows.get(table, key)  # type: ignore[arg-type]
                return None if row is None else {k: v for k, v in row.items() if k != "deposits"}

            def put(self, table: str, row: dict[str, object]) -> None:
                bump = 1 if event.type == DEPOSITED else 0
                rows.put(table, {**row, "deposits": deposits + bump})  # type: ignore[dict-item]

            def delete(self, table: str, key: tuple[object, ...]) -> None:
                rows.delete(table, key)  # type: ignore[arg-type]

        old(event, Shim())  # type: ignore[arg-type]

    return handle


ACCOUNT_BALANCES_V2 = Projection(
    ACCOUNT_BALANCES.name,
    2,
    (BALANCES_V2,),
    {name: _v2_handler(name) for name in ACCOUNT_BALANCES.handlers},
)
ALL_V2 = tuple(ACCOUNT_BALANCES_V2 if p.name == "account_balances" else p for p in projections.ALL)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/daybook.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(db_url)
    yield ledger
    ledger.close()


def test_schema_change_rebuild_while_commands_arrive(ledger: Ledger, db_url: str) -> None:
    ids = workload(ledger, 120)
    stop = threading.Event()
    problems: list[BaseException] = []
    reads = [0]

    def write() -> None:
        seed = 10
        while not stop.is_set():
            seed += 1
            workload(ledger, 5, seed=seed, accounts=ids)

    def read(views: object) -> None:
        while not stop.is_set():
            try:
                row = views.balance(ids[0])  # type: ignore[attr-defined]
                assert row is not None and row.currency == "USD"
                reads[0] += 1
            except BaseException as error:
                problems.append(error)
                return

    old = run_projections(ledger, db_url, poll_interval=0.01)
    old.views.balance(ids[0], min_position=ledger.head(), timeout=30)
    writer = threading.Thread(target=write)
    reader = threading.Thread(target=read, args=(old.views,))
    writer.start()
    reader.start()
    try:
        result = rebuild(
            event_log_of(ledger), db_url, ACCOUNT_BALANCES_V2, batch_size=50, stream=io.StringIO()
        )
        assert result.previous_version == 1
        # The new code is deployed: a runner with version 2 takes over from the old one.
        new = run_projections(ledger, db_url, projections=ALL_V2, poll_interval=0.01)
        reads_at_switch = reads[0]
        while reads[0] < reads_at_switch + 20 and not problems:
            stop.wait(0.01)
    finally:
        stop.set()
        writer.join()
        reader.join()
    assert not problems, problems
    new.views.balance(ids[0], min_position=ledger.head(), timeout=30)
    old.stop()
    new.stop()
    store = open_store(db_url)
    try:
        catalog = VersionCatalog(store)
        assert catalog.active_version("account_balances") == 2
        retired = catalog.version("account_balances", 1)
        assert retired is not None and retired.state is VersionState.RETIRED
        # Every projection at version 1, and account_balances at version 2 too.
        versions = store.execute("SELECT count(*) FROM daybook_projection_versions")[0][0]
        assert versions == len(projections.ALL) + 1
        with pytest.raises(Exception):  # noqa: B017 - dropped: sqlite and psycopg differ
            store.count(BALANCES, 1)
    finally:
        store.close()
    for projection in ALL_V2:
        assert_tables_match(ledger, db_url, projection)
    balance = new.views.balance(ids[0])
    assert balance is not None and balance.balance == ledger.account(ids[0]).balance


def test_an_interrupted_rebuild_resumes(ledger: Ledger, db_url: str) -> None:
    workload(ledger, 150)
    with run_projections(ledger, db_url, poll_interval=0.01) as live:
        live.views.balance(
            ledger.open_account("x", "EUR").account_id, min_position=ledger.head(), timeout=30
        )
    output = io.StringIO()
    batches = [0]

    class Interrupted(Exception):
        pass

    def stream_write(text: str) -> int:
        batches[0] += 1
        if batches[0] == 1:
            raise Interrupted
        return len(text)

    output.write = stream_write  # type: ignore[method-assign]
    with pytest.raises(Interrupted):
        rebuild(event_log_of(ledger), db_url, ACCOUNT_BALANCES_V2, batch_size=20, stream=output)
    store = open_store(db_url)
    partial = VersionCatalog(store).version("account_balances", 2)
    store.close()
    assert partial is not None and partial.state is VersionState.REBUILDING
    assert partial.position > 0
    result = rebuild(
        event_log_of(ledger), db_url, ACCOUNT_BALANCES_V2, batch_size=20, stream=io.StringIO()
    )
    assert result.resumed_from == partial.position
    assert result.events < ledger.head()
    assert_tables_match(ledger, db_url, ACCOUNT_BALANCES_V2)


def test_reconcile_finds_every_corruption_and_repairs_it(ledger: Ledger, db_url: str) -> None:
    ids = workload(ledger, 120)
    with run_projections(ledger, db_url, poll_interval=0.01) as runner:
        for name in ("account_balances", "account_statement", "daily_activity"):
            runner.views._read_at(name, lambda s, v: None, ledger.head(), 30.0)
    for projection in projections.ALL:
        assert reconcile(event_log_of(ledger), db_url, projection).clean
    assert main(["reconcile", "--url", db_url]) == 0

    store = open_store(db_url)
    a, b = str(ids[0]), str(ids[1])
    store.execute(
        f"UPDATE {BALANCES.physical_name(1)} SET balance = balance + 1 WHERE account_id = %s", (a,)
    )
    store.execute(f"DELETE FROM {BALANCES.physical_name(1)} WHERE account_id = %s", (b,))
    extra = {c: 0 for c in BALANCES.column_names} | {
        "account_id": "ghost",
        "owner": "ghost",
        "currency": "EUR",
        "status": "open",
        "last_event_at": "x",
    }
    store.upsert(BALANCES, 1, [extra])
    statement_row = store.select(STATEMENT, 1, "account_id = %s", [a], "seq", 1)[0]
    store.delete(STATEMENT, 1, [(a, statement_row["seq"])])
    store.execute(
        f"UPDATE {MONEY.physical_name(DAILY_ACTIVITY.version)} SET deposits = deposits * 2 + 1"
    )
    money_rows = store.count(MONEY, DAILY_ACTIVITY.version)
    store.close()

    report = reconcile(event_log_of(ledger), db_url, ACCOUNT_BALANCES)
    found = {(d.kind, d.key) for d in report.drifts}
    assert found == {("different", (a,)), ("missing", (b,)), ("extra", ("ghost",))}
    assert 0 < report.ranges_differing <= 3 < report.ranges_checked
    statement = reconcile(event_log_of(ledger), db_url, projections.ACCOUNT_STATEMENT)
    assert [(d.kind, d.key) for d in statement.drifts] == [("missing", (a, statement_row["seq"]))]
    activity = reconcile(event_log_of(ledger), db_url, projections.DAILY_ACTIVITY)
    assert len(activity.drifts) == money_rows and {d.kind for d in activity.drifts} == {"different"}

    assert main(["reconcile", "--url", db_url]) == 1
    assert main(["reconcile", "account_balances", "--url", db_url, "--repair"]) == 0
    assert main(["reconcile", "--url", db_url, "--repair"]) == 0
    assert main(["reconcile", "--url", db_url]) == 0
    store = open_store(db_url)
    try:
        log = store.execute("SELECT table_name, change FROM daybook_reconcile_log ORDER BY id")
        assert len(log) == 3 + 1 + money_rows
        assert ("account_balances", "extra") in log
    finally:
        store.close()

    # The runner drops its caches after a repair and carries on from the repaired rows.
    with run_projections(ledger, db_url, poll_interval=0.01) as runner:
        workload(ledger, 40, seed=5, accounts=ids)
        for name in ("account_balances", "account_statement", "daily_activity"):
            runner.views._read_at(name, lambda s, v: None, ledger.head(), 30.0)
    for projection in projections.ALL:
        assert_tables_match(ledger, db_url, projection)


def test_a_repair_rewrites_every_drifted_row_not_only_those_listed(
    ledger: Ledger, db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report lists a bounded number of drifted rows and counts the rest; a repair
    rewrites them all (summed rows too), and says repaired only then."""
    monkeypatch.setattr(reconcile_module, "DRIFTS_LISTED", 2)
    workload(ledger, 60)
    with run_projections(ledger, db_url, start=False) as runner:
        runner.run_until_caught_up()
    store = open_store(db_url)
    balances = store.count(BALANCES, 1)
    store.execute(f"UPDATE {BALANCES.physical_name(1)} SET balance = balance + 1")
    store.execute(
        f"UPDATE {MONEY.physical_name(DAILY_ACTIVITY.version)} SET deposits = deposits * 2 + 1"
    )
    store.close()
    assert balances > 2
    assert main(["reconcile", "account_balances", "--url", db_url, "--repair"]) == 0
    out = capsys.readouterr().out
    assert f"{balances} drifted rows, repaired" in out
    assert f"and {balances - 2} more" in out
    assert main(["reconcile", "daily_activity", "--url", db_url, "--repair"]) == 0
    assert main(["reconcile", "--url", db_url]) == 0
    for projection in (ACCOUNT_BALANCES, projections.DAILY_ACTIVITY):
        assert_tables_match(ledger, db_url, projection)


def test_the_rebuild_command_pauses_the_collector_only_while_it_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    collecting: list[bool] = []

    def spy(
        ledger: Ledger, url: str, chosen: list[Projection], **options: object
    ) -> list[RebuildResult]:
        collecting.append(gc.isenabled())
        return [RebuildResult(p.name, p.version, 0, 1.0, 0, None, 0) for p in chosen]

    monkeypatch.setattr(rebuild_jobs, "rebuild_together", spy)
    assert gc.isenabled()
    url = f"sqlite:///{tmp_path}/ledger.db"
    open_ledger(url).close()
    assert main(["projections", "rebuild", "account_balances", "--url", url]) == 0
    assert collecting == [False]
    assert gc.isenabled()
    assert "account_balances version 1 built" in capsys.readouterr().out


FAILING = {"on": False}


def _flaky_deposit(event: LogEvent, rows: Rows) -> None:
    if FAILING["on"] and event.data["amount"] == 13:
        raise ValueError("downstream lookup failed")
    ACCOUNT_BALANCES.handlers[DEPOSITED](event, rows)


FLAKY = replace(ACCOUNT_BALANCES, handlers={**ACCOUNT_BALANCES.handlers, DEPOSITED: _flaky_deposit})


def test_dead_letters_go_once_resolved_long_ago_or_with_their_versions_tables(
    tmp_path: Path,
) -> None:
    """Each incident (an event parked, the version stopped, fixed, resumed) left a row in
    daybook_dead_letters for good. A letter resolved more than 30 days ago now goes at the
    next resume, and a retired version's letters go with its tables."""
    url = f"sqlite:///{tmp_path}/d.db"
    ledger = open_ledger(url)
    account = ledger.open_account("ann", "EUR").account_id
    rm = f"sqlite:///{tmp_path}/rm.db"
    counts = []
    incidents = 6
    try:
        for _ in range(incidents):
            ledger.deposit(account, 13)
            FAILING["on"] = True
            runner = run_projections(
                ledger, rm, projections=[FLAKY], start=False, max_attempts=2, retry_backoff=0.0
            )
            for _ in range(4):
                runner.step()
            runner.stop()
            FAILING["on"] = False  # fixed (the downstream came back); an operator resumes
            store = open_store(rm)
            with store.transaction():  # the previous incidents were long ago
                store.execute(
                    "UPDATE daybook_dead_letters SET resolved_at = %s"
                    " WHERE resolved_at IS NOT NULL",
                    ("2020-01-01T00:00:00.000000+00:00",),
                )
            VersionCatalog(store).resume("account_balances", 1)
            counts.append(len(DeadLetters(store).entries()))
            store.close()
        # Later the projection is rebuilt as v2; v1 is retired and its tables dropped.
        runner = run_projections(ledger, rm, projections=[replace(FLAKY, version=2)], start=False)
        runner.run_until_caught_up()
        runner.stop()
        store = open_store(rm)
        try:
            record = VersionCatalog(store).version("account_balances", 1)
            left = len(DeadLetters(store).entries())
            v1_tables = store.execute(
                "SELECT tables FROM daybook_projection_versions WHERE version = 1"
            )[0][0]
        finally:
            store.close()
    finally:
        ledger.close()
    assert counts == [1] * incidents, counts  # the resolved of long ago went at each resume
    assert record is not None and record.state is VersionState.RETIRED and v1_tables == "[]"
    assert left == 0, (
        f"daybook_dead_letters after {incidents} resolved incidents and v1 retired "
        f"({record.state.value}, tables {v1_tables}): {left} rows; per incident {counts}"
    )


def test_a_retired_versions_reconcile_history_goes_with_its_tables(tmp_path: Path) -> None:
    """daybook_reconcile_runs keeps 100 runs and daybook_reconcile_log 10,000 repairs per
    version; a version retired by a rebuild (its tables dropped) kept both for good: every
    rebuild added up to 10,100 rows. They now go with its tables (its catalog row stays:
    it stops a runner of old code from building that version anew)."""
    url = f"sqlite:///{tmp_path}/d.db"
    rm = f"sqlite:///{tmp_path}/rm.db"
    ledger = open_ledger(url)
    accounts = [ledger.open_account(f"o{n}", "EUR").account_id for n in range(5)]
    for account in accounts:
        ledger.deposit(account, 10)
    log = event_log_of(ledger)
    rebuilds = 5
    seen = []
    try:
        for version in range(1, rebuilds + 1):
            projection = replace(ACCOUNT_BALANCES, version=version)
            runner = run_projections(ledger, rm, projections=[projection], start=False)
            runner.run_until_caught_up()
            runner.stop()
            for _ in range(3):  # drift (a stray write), found and repaired by the reconciler
                store = open_store(rm)
                with store.transaction():
                    store.execute(f"UPDATE rm_account_balances_v{version} SET balance = 999")
                store.close()
                reconciler = ContinuousReconciler(
                    log, rm, [projection], every_seconds=0, repair=True
                )
                assert reconciler.run_due()
            store = open_store(rm)
            try:
                seen.append(
                    tuple(
                        store.execute(f"SELECT count(*) FROM {t}")[0][0]
                        for t in (
                            "daybook_reconcile_runs",
                            "daybook_reconcile_log",
                            "daybook_projection_versions",
                        )
                    )
                )
                retired = store.execute(
                    "SELECT count(*) FROM daybook_reconcile_log l JOIN daybook_projection_versions"
                    " v ON v.name = l.name AND v.version = l.version WHERE v.state = 'retired'"
                )[0][0]
                retired_runs = store.execute(
                    "SELECT count(*) FROM daybook_reconcile_runs l JOIN daybook_projection_versions"
                    " v ON v.name = l.name AND v.version = l.version WHERE v.state = 'retired'"
                )[0][0]
            finally:
                store.close()
    finally:
        ledger.close()
    assert retired == 0 and retired_runs == 0, (
        f"retired versions (tables dropped) keep {retired} repair rows and {retired_runs} run "
        f"rows; (runs, repairs, catalog rows) after each rebuild: {seen}"
    )


def _switching_first(call, log, url: str, switched: list[bool]):  # type: ignore[no-untyped-def]
    """``call``, which first switches reads of account_balances to version 2 (an operator's
    `daybook projections rebuild` with new code; the switch drops version 1's tables)."""

    def hooked(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not switched:
            switched.append(True)
            rebuild(log, url, ACCOUNT_BALANCES_V2, progress=False)
        return call(*args, **kwargs)

    return hooked


@pytest.mark.parametrize("during", ["the fold", "the comparison"])
def test_a_switch_during_a_reconcile_run_skips_the_version_it_retired(
    ledger: Ledger, db_url: str, monkeypatch: pytest.MonkeyPatch, during: str
) -> None:
    """A rebuild switches reads and drops the old version's tables while the continuous
    reconciler works on that version: during its fold (which holds no transaction), or
    between its look at the version's state and its comparison. The run is skipped and
    recorded nowhere (a retired version's runs go with its tables); the service goes on,
    where it used to meet the missing tables and stop for good."""
    workload(ledger, 40)
    with run_projections(ledger, db_url, start=False) as runner:
        runner.run_until_caught_up()
    log = event_log_of(ledger)
    switched: list[bool] = []
    if during == "the fold":
        hooked = _switching_first(reconcile_module.Fold.advance, log, db_url, switched)
        monkeypatch.setattr(reconcile_module.Fold, "advance", hooked)
    else:
        hooked = _switching_first(reconcile_module._compare, log, db_url, switched)
        monkeypatch.setattr(reconcile_module, "_compare", hooked)
    watcher = ContinuousReconciler(log, db_url, [ACCOUNT_BALANCES], every_events=1, every_seconds=0)
    failed = _failed_runs(ACCOUNT_BALANCES.name)
    assert watcher.run_due() == []
    assert switched
    assert _failed_runs(ACCOUNT_BALANCES.name) == failed  # skipped: no failed run to alert on
    store = open_store(db_url)
    try:
        record = VersionCatalog(store).version(ACCOUNT_BALANCES.name, 1)
        assert record is not None and record.state is VersionState.RETIRED
        assert last_runs(store) == {}
    finally:
        store.close()
    # The new code's reconciler reconciles the version that now serves.
    (run,) = ContinuousReconciler(log, db_url, [ACCOUNT_BALANCES_V2], every_seconds=0).run_due()
    assert run.error is None and run.drifted == 0


def _failed_runs(name: str) -> float:
    labels = {"projection": name, "result": "failed"}
    return metrics.REGISTRY.get_sample_value("daybook_reconciler_runs_total", labels) or 0.0


def test_a_switch_just_before_a_run_skips_the_version_quietly(
    ledger: Ledger, db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The switch commits between the continuous reconciler's look at the serving versions
    and its run's first look at the version: it was logged as an error and counted failed,
    where a switch a moment later is a skip."""
    workload(ledger, 40)
    with run_projections(ledger, db_url, start=False) as runner:
        runner.run_until_caught_up()
    log = event_log_of(ledger)
    switched: list[bool] = []
    hooked = _switching_first(reconcile_module.reconcile, log, db_url, switched)
    monkeypatch.setattr(reconciler_module, "reconcile", hooked)
    watcher = ContinuousReconciler(log, db_url, [ACCOUNT_BALANCES], every_events=1, every_seconds=0)
    failed = _failed_runs(ACCOUNT_BALANCES.name)
    with caplog.at_level(logging.ERROR, logger="daybook"):
        assert watcher.run_due() == []
    assert switched and _failed_runs(ACCOUNT_BALANCES.name) == failed
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_an_outage_of_the_fold_store_is_not_a_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fold reads rows a handler misses from its scratch store: that store not answering
    was reported `refused (reconcile_failed)` (a definition that refuses the log, exit 1)
    and recorded as a failed run. It is an outage: exit 2, nothing recorded."""
    url = f"sqlite:///{tmp_path}/daybook.db"
    with open_ledger(url) as ledger:
        workload(ledger, 20)
        with run_projections(ledger, url, start=False) as runner:
            runner.run_until_caught_up()
    monkeypatch.setattr(reconcile_module, "FOLD_CACHE", 0)
    monkeypatch.setattr(reconcile_module, "FOLD_BATCH", 1)

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    original = reconcile_module.Fold.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        monkeypatch.setattr(self.store, "fetch", unreachable)

    monkeypatch.setattr(reconcile_module.Fold, "__init__", init)
    failed = _failed_runs(ACCOUNT_BALANCES.name)
    assert main(["reconcile", "account_balances", "--url", url]) == 2
    err = capsys.readouterr().err
    assert "refused" not in err and "did not answer" in err, err
    assert _failed_runs(ACCOUNT_BALANCES.name) == failed  # nor counted as a failed run
    store = open_store(url)
    try:
        assert last_runs(store) == {}
    finally:
        store.close()


def test_an_outage_during_a_reconcile_is_not_counted_as_a_failed_run(tmp_path: Path) -> None:
    """Each attempt of a continuous reconciler retrying through an outage of the event store
    was counted in `daybook_reconciler_runs_total{result="failed"}`, though no run is
    recorded as failed: an hour's outage made hundreds. A log that cannot be folded is a
    failed run, and is counted, as is a run that fails for a reason no retry cures."""
    url = f"sqlite:///{tmp_path}/daybook.db"
    with open_ledger(url) as ledger:
        workload(ledger, 20)
        with run_projections(ledger, url, start=False) as runner:
            runner.run_until_caught_up()
        log = event_log_of(ledger)
        failed = _failed_runs(ACCOUNT_BALANCES.name)
        scan = log.scan

        def away(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionRefusedError(111, "Connection refused")

        log.scan = away  # type: ignore[method-assign]
        for _ in range(3):  # three attempts of the service waiting the outage out
            with pytest.raises(ConnectionRefusedError):
                reconcile(log, url, ACCOUNT_BALANCES)
        assert _failed_runs(ACCOUNT_BALANCES.name) == failed
        log.scan = scan  # type: ignore[method-assign]

        def refuses(event: LogEvent, rows: Rows) -> None:
            raise ValueError("this definition refuses every deposit")

        refusing = replace(
            ACCOUNT_BALANCES, handlers={**ACCOUNT_BALANCES.handlers, DEPOSITED: refuses}
        )
        with pytest.raises(reconcile_module.ReconcileError):
            reconcile(log, url, refusing)
        assert _failed_runs(ACCOUNT_BALANCES.name) == failed + 1
        # A run that fails for a reason no retry cures (a repair that cannot write) is
        # failed too, though no run is recorded: the service stops on it.
        scan = log.scan

        def cannot_write(*args: Any, **kwargs: Any) -> Any:
            raise sqlite3.IntegrityError("UNIQUE constraint failed: rm_account_balances_v1.id")

        log.scan = cannot_write  # type: ignore[method-assign]
        with pytest.raises(sqlite3.IntegrityError):
            reconcile(log, url, ACCOUNT_BALANCES, repair=True)
        assert _failed_runs(ACCOUNT_BALANCES.name) == failed + 2
        log.scan = scan  # type: ignore[method-assign]


def test_a_full_reconcile_pass_skips_a_version_retired_during_its_run(
    ledger: Ledger, db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`daybook reconcile` while a rebuild switches the projection it folds: that one is
    skipped, said so, and the pass goes on with the others (it used to end in a traceback)."""
    workload(ledger, 40)
    with run_projections(ledger, db_url, start=False) as runner:
        runner.run_until_caught_up()
    switched: list[bool] = []
    hooked = _switching_first(reconcile_module.Fold.advance, event_log_of(ledger), db_url, switched)
    monkeypatch.setattr(reconcile_module.Fold, "advance", hooked)
    assert main(["reconcile", "--url", db_url]) == 0
    out = capsys.readouterr().out
    assert switched
    assert "account_balances: skipped (account_balances version 1 was retired" in out
    assert "daily_activity v" in out and "clean" in out


def test_reconcile_prints_the_drifted_rows_its_help_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`daybook reconcile --help` said it prints every missing, extra or different row; it
    prints the first 1,000 of each projection and counts the rest, as the README says."""
    url = f"sqlite:///{tmp_path}/daybook.db"
    with open_ledger(url) as ledger:
        ledger.open_account("ann", "EUR")
        with run_projections(ledger, url, start=False) as runner:
            runner.run_until_caught_up()
    store = open_store(url)
    try:
        with store.transaction():
            store.insert(BALANCES, 1, [
                {"account_id": str(uuid.UUID(int=n + 1)), "owner": "ghost", "currency": "EUR",
                 "balance": 0, "held": 0, "available": 0, "overdraft_limit": 0,
                 "status": "open", "version": 1, "last_event_at": "x", "position": 1}
                for n in range(1_005)
            ])  # fmt: skip
    finally:
        store.close()
    commands = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    help_text = " ".join(commands.choices["reconcile"].format_help().split())
    assert "Prints the first 1,000 missing, extra or different rows of each projection" in (
        help_text
    ), help_text
    assert main(["reconcile", "account_balances", "--url", url]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.endswith(" extra")]) == 1_000
    assert lines[-1] == "  ... and 5 more"
