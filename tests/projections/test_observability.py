"""The read side observed: the runner's and the reconciler's metrics after known work, the
projection batch in the trace of the command that caused it, and ``daybook project``'s
JSON log lines."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import psycopg
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from daybook import open_ledger, run_projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.observability import metrics
from daybook.infrastructure.readmodels.catalog import VersionCatalog
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.reconcile import reconcile
from daybook.projections.accounts import ACCOUNT_BALANCES as BALANCES
from daybook.projections.accounts import BALANCES as BALANCES_TABLE
from tests.projections.helpers import workload

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def scraped(body: bytes, name: str, **labels: str) -> float | None:
    """A sample's value in a Prometheus text exposition (None if absent)."""
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def test_the_runner_counts_applied_events_convergence_and_lag_after_known_work(
    pg_url: str,
) -> None:
    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    runner = run_projections(ledger, pg_url, start=False)
    try:
        runner.run_until_caught_up()
        start = ledger.head()
        labels = {"projection": BALANCES.name, "version": str(BALANCES.version)}
        applied = value("daybook_projection_applied_events_total", **labels)
        converged = value("daybook_convergence_seconds_count", projection=BALANCES.name)
        # (The process's earlier tests' events count too: some converged after a minute.)
        within = value("daybook_convergence_seconds_bucket", projection=BALANCES.name, le="60.0")
        for amount in range(1, 26):
            ledger.deposit(account, amount)
        written = len(event_log_of(ledger).read(start, 10_000))
        assert written == 25  # one event a deposit
        runner.run_until_caught_up()
        body = metrics.exposition()
    finally:
        runner.stop()
        ledger.close()
    assert scraped(body, "daybook_projection_applied_events_total", **labels) == applied + 25
    assert (
        scraped(body, "daybook_convergence_seconds_count", projection=BALANCES.name)
        == converged + 25
    )
    # Every event converged after its own time, and within the test's run.
    assert scraped(body, "daybook_convergence_seconds_bucket", projection=BALANCES.name,
                   le="60.0") == within + 25  # fmt: skip
    assert scraped(body, "daybook_projection_lag_events", **labels) == 0
    assert scraped(body, "daybook_projection_lag_seconds", **labels) == 0
    assert scraped(body, "daybook_projection_parked_events", **labels) == 0


def test_lag_counts_the_events_a_version_has_not_applied_yet(pg_url: str) -> None:
    ledger = open_ledger(pg_url)
    account = ledger.open_account("bob", "EUR").account_id
    for amount in range(1, 31):
        ledger.deposit(account, amount)
    runner = run_projections(ledger, pg_url, start=False, batch_size=10)
    labels = {"projection": BALANCES.name, "version": str(BALANCES.version)}
    try:
        runner.step()  # the first 10 of 31 events
        assert value("daybook_projection_lag_events", **labels) == 21
        assert value("daybook_projection_lag_seconds", **labels) > 0
        runner.run_until_caught_up()
        assert value("daybook_projection_lag_events", **labels) == 0
        assert value("daybook_projection_lag_seconds", **labels) == 0
    finally:
        runner.stop()
        ledger.close()


def test_the_reconciler_counts_runs_by_result_and_drifted_rows(pg_url: str) -> None:
    ledger = open_ledger(pg_url)
    account = ledger.open_account("cy", "EUR").account_id
    ledger.deposit(account, 10)
    runner = run_projections(ledger, pg_url, start=False)
    runner.run_until_caught_up()
    runner.stop()
    log = event_log_of(ledger)
    name = BALANCES.name
    clean = value("daybook_reconciler_runs_total", projection=name, result="clean")
    repaired = value("daybook_reconciler_runs_total", projection=name, result="repaired")
    drift = value("daybook_reconciler_runs_total", projection=name, result="drift")
    found = value("daybook_reconciler_drift_rows_total", projection=name, repaired="false")
    fixed = value("daybook_reconciler_drift_rows_total", projection=name, repaired="true")
    try:
        assert reconcile(log, pg_url, BALANCES).clean
        with psycopg.connect(pg_url, autocommit=True) as conn:  # one row: drift
            conn.execute(f"DELETE FROM {BALANCES_TABLE.physical_name(BALANCES.version)}")
        assert reconcile(log, pg_url, BALANCES).drift_count == 1
        assert reconcile(log, pg_url, BALANCES, repair=True).repaired
    finally:
        ledger.close()
    assert value("daybook_reconciler_runs_total", projection=name, result="clean") == clean + 1
    assert value("daybook_reconciler_runs_total", projection=name, result="drift") == drift + 1
    assert (
        value("daybook_reconciler_runs_total", projection=name, result="repaired") == repaired + 1
    )
    assert value("daybook_reconciler_drift_rows_total", projection=name, repaired="false") == (
        found + 1
    )
    assert value("daybook_reconciler_drift_rows_total", projection=name, repaired="true") == (
        fixed + 1
    )


def test_the_projection_batch_continues_the_trace_of_the_command_that_caused_it(
    pg_url: str, spans: InMemorySpanExporter
) -> None:
    ledger = open_ledger(pg_url)
    account = ledger.open_account("dee", "EUR").account_id
    runner = run_projections(ledger, pg_url, start=False)
    try:
        runner.run_until_caught_up()
        spans.clear()
        first = ledger.deposit(account, 5)
        second = ledger.deposit(account, 7)
        runner.run_until_caught_up()
    finally:
        runner.stop()
        ledger.close()
    finished = spans.get_finished_spans()
    commands = [s for s in finished if s.name == "command deposit"]
    applies = [s for s in finished if s.name == "daybook.projection.apply"]
    assert len(commands) == 2
    # One batch held both commands' events: one span for each, in each command's trace.
    assert len(applies) == 2
    by_parent = {s.parent.span_id: s for s in applies if s.parent is not None}
    for command, receipt in zip(commands, (first, second), strict=True):
        apply = by_parent[command.context.span_id]
        assert apply.context.trace_id == command.context.trace_id
        assert apply.attributes is not None
        assert apply.attributes["daybook.events"] == 1
        assert apply.attributes["daybook.position.first"] == receipt.position
        assert BALANCES.name in apply.attributes["daybook.projection"]
        assert apply.attributes["daybook.batch.size"] == 2


def test_project_logs_json_lines_and_serves_its_metrics(pg_url: str, tmp_path: Path) -> None:
    ledger = open_ledger(pg_url)
    account = ledger.open_account("eve", "EUR").account_id
    ledger.deposit(account, 3)
    head = ledger.head()
    ledger.close()
    out = tmp_path / "project.log"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daybook.infrastructure.cli", "project", "--url", pg_url,
             "--log-format", "json", "--metrics-port", "0", "--poll-interval", "0.05"],
            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "caught up" not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        port = next(
            line["metrics_port"]
            for line in map(orjson.loads, out.read_text().splitlines())
            if "metrics_port" in line
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as answer:
            body = answer.read()
        labels = {"projection": BALANCES.name, "version": str(BALANCES.version)}
        assert scraped(body, "daybook_projection_applied_events_total", **labels) == head
        assert scraped(body, "daybook_projection_lag_events", **labels) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, out.read_text()
    lines = [orjson.loads(line) for line in out.read_text().splitlines()]  # every line JSON
    events = [line["event"] for line in lines]
    assert all({"time", "level", "logger", "event"} <= line.keys() for line in lines)
    assert "projection runner: started" in events
    assert any(e.startswith(f"projection runner: caught up at log position {head}") for e in events)
    assert "projection runner: stopped" in events
    assert events.index("projection runner: started") < events.index("projection runner: stopped")


def test_the_runner_says_once_that_it_caught_up_and_again_after_a_reconnect(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = open_ledger(pg_url)
    account = ledger.open_account("fay", "EUR").account_id
    caplog.set_level(logging.INFO)
    with run_projections(ledger, pg_url, poll_interval=0.01) as runner:
        runner.views.balance(account, min_position=ledger.head(), timeout=60)
        for amount in range(1, 6):  # caught up already: no line per event
            receipt = ledger.deposit(account, amount)
        runner.views.balance(account, min_position=receipt.position, timeout=60)
        with psycopg.connect(pg_url, autocommit=True) as admin:  # an outage
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        receipt = ledger.deposit(account, 11)
        runner.views.balance(account, min_position=receipt.position, timeout=60)
        deadline = time.monotonic() + 30
        while sum("caught up" in r.getMessage() for r in caplog.records) < 2:
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)
    ledger.close()
    said = [r.getMessage() for r in caplog.records if r.name.startswith("daybook")]
    lines = [m for m in said if m.startswith("projection runner:")]
    caught_up = [m for m in lines if "caught up" in m]
    assert len(caught_up) == 2, lines
    assert lines[0] == "projection runner: started"
    recovered = next(i for i, m in enumerate(lines) if m.startswith("projection runner: recovered"))
    again = [i for i, m in enumerate(lines) if "caught up" in m][1]
    assert recovered < again, lines  # said again once the reconnected runner caught up
    assert lines[-1] == "projection runner: stopped"


def test_the_continuous_reconciler_serves_its_runs_and_logs_json(
    pg_url: str, tmp_path: Path
) -> None:
    ledger = open_ledger(pg_url)
    ledger.deposit(ledger.open_account("gus", "EUR").account_id, 4)
    runner = run_projections(ledger, pg_url, start=False)
    runner.run_until_caught_up()
    runner.stop()
    ledger.close()
    out = tmp_path / "reconcile.log"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daybook.infrastructure.cli", "reconcile", "account_balances",
             "--continuous", "--every-seconds", "0.2", "--url", pg_url,
             "--log-format", "json", "--metrics-port", "0"],
            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while out.read_text().count("clean at") < 2:  # two runs, each one line
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        port = next(
            line["metrics_port"]
            for line in map(orjson.loads, out.read_text().splitlines())
            if "metrics_port" in line
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as answer:
            body = answer.read()
        runs = scraped(body, "daybook_reconciler_runs_total", projection=BALANCES.name,
                       result="clean")  # fmt: skip
        assert runs is not None and runs >= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, out.read_text()
    events = [orjson.loads(line)["event"] for line in out.read_text().splitlines()]
    assert events[1] == "continuous reconciler: started", events[:3]
    assert events[-1] == "continuous reconciler: stopped"


def test_a_parked_event_shows_in_the_parked_gauge(pg_url: str) -> None:
    from tests.projections.test_runner import _poisoned

    poisoned, _ = _poisoned(fail_times=None)
    ledger = open_ledger(pg_url)
    account = ledger.open_account("hal", "EUR").account_id
    ledger.deposit(account, 13)  # the poisoned amount
    labels = {"projection": BALANCES.name, "version": str(BALANCES.version)}
    runner = run_projections(
        ledger, pg_url, projections=[poisoned], start=False, max_attempts=2, retry_backoff=0.001
    )
    try:
        runner.step()
        assert value("daybook_projection_parked_events", **labels) == 0  # read at the claim
        for _ in range(3):
            runner.step()
        assert value("daybook_projection_parked_events", **labels) == 1
    finally:
        runner.stop()
        ledger.close()


def test_a_runner_failing_with_no_version_in_hand_reports_no_lag_it_let_go_of(
    tmp_path: Path,
) -> None:
    """After a failure the runner's lag gauges follow the log (see ``_hold_lag``). A later
    failure with no version in hand brought back the lag of a version it had handed over,
    from its position of long ago."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    ledger = open_ledger(url)
    labels = {"projection": BALANCES.name, "version": str(BALANCES.version)}

    def lag() -> float | None:
        return metrics.REGISTRY.get_sample_value("daybook_projection_lag_events", labels)

    try:
        workload(ledger, 20)
        runner = run_projections(ledger, url, projections=[BALANCES], start=False)
        runner.run_until_caught_up()
        assert lag() == 0
        # A transient failure (the read-model database blips): judged, on_failure runs.
        runner.service.supervisor.judge(ConnectionResetError("read models blip"))
        position = ledger.head()
        # Meanwhile the version is handed over to a stream group (another writer).
        store = open_store(url)
        try:
            with store.transaction():
                VersionCatalog(store).set_owner(
                    BALANCES.name, BALANCES.version, "group:x", position=position
                )
        finally:
            store.close()
        runner.step()  # reconnects; leaves the version alone, and stops reporting its lag
        assert lag() is None
        workload(ledger, 10, seed=2)
        # Another blip, with no version in hand: the runner reports the lag of the version
        # it let go of, from the position it had long ago.
        runner.service.supervisor.judge(ConnectionResetError("read models blip again"))
        assert lag() is None, f"lag of a version another writer follows: {lag()}"
        runner.stop()
    finally:
        ledger.close()
