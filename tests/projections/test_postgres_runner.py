"""PostgreSQL-only runner behaviour: one writer per version, LISTEN/NOTIFY, reconnection."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from daybook import open_event_log, open_ledger, projections, run_projections
from daybook.infrastructure.lifecycle import ServiceState
from tests.pg_locks import listening_sessions, wait_for_advisory_locks_released
from tests.projections.helpers import assert_tables_match, workload

pytestmark = pytest.mark.postgres


def test_a_second_runner_stands_by_and_takes_over(pg_url: str) -> None:
    ledger = open_ledger(pg_url)
    ids = workload(ledger, 60)
    first = run_projections(ledger, pg_url, start=False)
    first.run_until_caught_up()
    second = run_projections(ledger, pg_url, start=False)
    workload(ledger, 30, seed=2, accounts=ids)
    assert second.step() == 0 and not second.slots  # every version is locked by the first
    first.stop()  # its session ends: the locks are free once the server has ended it
    wait_for_advisory_locks_released(pg_url)
    second.run_until_caught_up()
    assert len(second.slots) == len(projections.ALL)
    second.stop()
    for projection in projections.ALL:
        assert_tables_match(ledger, pg_url, projection)
    ledger.close()


def test_notify_wakes_the_runner_long_before_the_poll_interval(pg_url: str) -> None:
    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    with run_projections(ledger, pg_url, poll_interval=3600) as runner:
        runner.views.balance(account, min_position=ledger.head(), timeout=60)
        receipt = ledger.deposit(account, 5)
        # With an hour between polls, only the notification can bring this in.
        row = runner.views.balance(account, min_position=receipt.position, timeout=60)
        assert row is not None and row.balance == 5
    ledger.close()


def test_the_runner_reconnects_after_its_connections_are_killed(pg_url: str) -> None:
    ledger = open_ledger(pg_url)
    ids = workload(ledger, 30)
    with run_projections(ledger, pg_url, poll_interval=0.01) as runner:
        runner.views.balance(ids[0], min_position=ledger.head(), timeout=60)
        with psycopg.connect(pg_url, autocommit=True) as admin:
            # What a server restart does to every session but ours.
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        receipt = ledger.deposit(ids[0], 11)
        row = runner.views.balance(ids[0], min_position=receipt.position, timeout=60)
        assert row is not None
        assert runner.error is None
        health = runner.health()
        assert health.state is ServiceState.RUNNING and health.restarts >= 1
    for projection in projections.ALL:
        assert_tables_match(ledger, pg_url, projection)
    ledger.close()


def test_a_commit_before_listening_starts_is_not_missed(pg_url: str) -> None:
    """What commits between a reader's last read and its first LISTEN notifies nobody: the
    first wait returns at once so the reader reads again, instead of sleeping a poll
    interval (an hour here) on a notification that already went by."""
    ledger = open_ledger(pg_url)
    log = open_event_log(pg_url)
    log.head()  # the reader's read
    ledger.open_account("ann", "EUR")  # commits before the reader listens
    waiting = threading.Thread(target=log.wait, args=(3600,), daemon=True)
    waiting.start()
    waiting.join(timeout=60)
    returned = not waiting.is_alive()
    log.interrupt()
    log.close()
    ledger.close()
    assert returned, "the first wait slept through a commit made before it listened"


def test_a_runner_that_failed_stops_listening(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session that listens and is never read holds back PostgreSQL's notification
    queue, shared by the whole server: every commit adds to it (once the session's socket
    is full, after some 100,000), up to its 8 GB, and then every commit fails. A runner
    that failed for good reads no more, so it must not go on listening."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    runner = run_projections(ledger, pg_url, poll_interval=0.05)
    try:
        runner.views.balance(account, min_position=ledger.head(), timeout=60)
        deadline = time.monotonic() + 30
        while listening_sessions(pg_url) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # it listens from its first wait on
        assert listening_sessions(pg_url) == 1

        def a_bug() -> int:
            raise RuntimeError("a bug in the runner")

        monkeypatch.setattr(runner, "step", a_bug)
        ledger.deposit(account, 5)  # wakes it
        runner.service.join(60)
        assert runner.health().state is ServiceState.FAILED
        for _ in range(50):
            ledger.deposit(account, 5)  # the service goes on writing
        assert listening_sessions(pg_url) == 0
    finally:
        runner.stop()
        ledger.close()


def test_a_busy_runner_reads_its_notifications_as_it_goes(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every commit NOTIFYs the runner's LISTEN session, and the runner reads that session
    only when a step found nothing (it waits then). Under steady load every step finds
    events, so it never waits: the notifications pile up unread, and once the session's
    socket is full they hold back PostgreSQL's notification queue (shared by the whole
    server, 8 GB, then every commit fails) for as long as the load lasts. N busy steps
    must not leave N notifications waiting."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    runner = run_projections(ledger, pg_url, poll_interval=0.05, start=False)
    busy = 200
    steps = 0
    backlog: list[int] = []
    done = threading.Event()
    real_step = runner.step

    def step_under_load() -> int:
        nonlocal steps
        listen = runner.log._listen
        if listen is None or done.is_set():
            return real_step()  # not listening yet (it listens from its first wait on)
        if steps < busy:
            steps += 1
            ledger.deposit(account, 1)  # a command commits during every step: load
            return real_step()
        # The load is over: what is waiting unread on the runner's LISTEN session now.
        backlog.append(sum(1 for _ in listen.notifies(timeout=0)))
        done.set()
        return real_step()

    monkeypatch.setattr(runner, "step", step_under_load)
    runner.start()
    try:
        assert done.wait(120), "the runner never got through the load"
    finally:
        runner.stop()
        ledger.close()
    assert steps == busy
    assert backlog[0] <= 1, (
        f"{backlog[0]} notifications left unread on the runner's LISTEN session after "
        f"{busy} busy steps"
    )
