"""Read-model writers on one PostgreSQL database take their locks in one order, so that none
waits for another in a cycle ('deadlock detected') and none holds others up for longer than
its own step.

Each test makes the interleaving happen: a hook in one writer's step starts the other writer
at the worst moment and waits until it waits for a lock (or, where the fixed order means it
does not, until it is done). Each then checks the outcomes and PostgreSQL's own count of
deadlocks once every session has ended.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any
from uuid import UUID

import pytest
from psycopg.errors import DeadlockDetected

from daybook import Ledger, open_ledger, projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.readmodels import reconcile as reconcile_module
from daybook.infrastructure.readmodels.catalog import VersionCatalog
from daybook.infrastructure.readmodels.handover import partition_of
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.queries import ReadModels, StaleRead
from daybook.infrastructure.readmodels.reconcile import reconcile
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.infrastructure.streaming.worker import StreamApplier
from daybook.projections.accounts import ACCOUNT_BALANCES, ACCOUNT_STATEMENT, BALANCES
from tests.pg_locks import deadlocks_once_all_sessions_ended, wait_for_lock_waits, waits_or_finishes
from tests.projections.helpers import assert_tables_match
from tests.projections.test_rebuild_reconcile import ACCOUNT_BALANCES_V2
from tests.streaming.messages import Stream, of_partitions

pytestmark = pytest.mark.postgres


def outcome_of(outcomes: dict[str, str], name: str, step: Callable[[], Any]) -> None:
    """Run ``step``, noting ``done`` or the first line of its error under ``name``."""
    try:
        step()
        outcomes[name] = "done"
    except Exception as error:
        outcomes[name] = f"{type(error).__name__}: {error}".splitlines()[0]


def in_thread(outcomes: dict[str, str], name: str, step: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=outcome_of, args=(outcomes, name, step))
    thread.start()
    return thread


def test_a_worker_switching_a_version_and_another_workers_batch_never_deadlock(
    pg_url: str,
) -> None:
    """Worker A of a stream group has every event of a new version in and switches it to
    serve: it builds the append-only statement table's key, which locks the table in SHARE
    mode. Worker B's batch holds its progress row and the version's catalog row FOR SHARE,
    then appends to that table. Built inside the switch's transaction, the key's lock was
    held while the switch waited for the catalog row that B held, and B waited for the
    table: a deadlock, and a switch rolled back (its index build with it) or a batch lost."""
    ledger = open_ledger(pg_url)
    # Accounts on both partitions (each worker must have statement rows to append).
    partition = partition_of(2)
    accounts: list[UUID] = []
    while len({partition(str(account)) for account in accounts}) < 2 or len(accounts) < 8:
        accounts.append(ledger.open_account(f"owner-{len(accounts)}", "EUR").account_id)
    for account in accounts:
        ledger.deposit(account, 100)
    stream, outcomes, threads = Stream(2), {}, []
    first = stream.publish(ledger)
    a, b = (
        StreamApplier(pg_url, [ACCOUNT_STATEMENT], group="g", topic="t", partitions=2, writer=w)
        for w in "ab"
    )
    b.apply(of_partitions(first, 1))
    store = a.connect()
    build = store.create_unique_index

    def build_then_batch_of_b(*args: Any) -> None:
        build(*args)  # the SHARE lock on the statement table, held to COMMIT
        for account in accounts:
            ledger.deposit(account, 1)
        more = of_partitions(stream.publish(ledger), 1)
        threads.append(in_thread(outcomes, "b", lambda: b.apply(more)))
        wait_for_lock_waits(pg_url, 1, "worker B's batch")  # for the table

    store.create_unique_index = build_then_batch_of_b  # type: ignore[method-assign]
    outcome_of(outcomes, "a", lambda: a.apply(of_partitions(first, 0)))  # caught up: switch
    for thread in threads:
        thread.join(30)
    record = VersionCatalog(store).version("account_statement", 1)
    assert record is not None
    a.close(), b.close(), ledger.close()
    assert outcomes == {"a": "done", "b": "done"}
    assert record.state.value == "live"
    assert deadlocks_once_all_sessions_ended(pg_url) == 0


def _a_v1_batch_as_reads_switch(
    pg_url: str,
    ledger: Ledger,
    account: UUID,
    old: ProjectionRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[dict[str, str], list[threading.Thread], list[int]]:
    """Make the first switch of reads (``VersionCatalog.activate``) begin with a deposit
    that the old code's runner ``old`` then applies to version 1 in a thread (waiting on a
    lock, or done), and note the position a client reads meanwhile: the outcomes, that
    thread, and the positions seen."""
    outcomes: dict[str, str] = {}
    threads: list[threading.Thread] = []
    seen: list[int] = []
    activate = VersionCatalog.activate

    def batch_of_v1_then_activate(catalog: VersionCatalog, *args: Any, **options: Any) -> Any:
        if not threads:
            ledger.deposit(account, 5)  # a command commits, and the old runner applies it
            threads.append(in_thread(outcomes, "old", old.step))
            waits_or_finishes(pg_url, threads[0], 1)
            with ReadModels(pg_url) as reads:  # what a client reads meanwhile
                row = reads.balance(account)
                assert row is not None
                seen.append(row.as_of_position)
        return activate(catalog, *args, **options)

    monkeypatch.setattr(VersionCatalog, "activate", batch_of_v1_then_activate)
    return outcomes, threads, seen


def test_a_switch_never_serves_a_version_behind_the_one_it_replaces(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rolling deploy: the old code's runner follows version 1, the new code's runner
    builds version 2 and switches reads to it once it is not behind version 1. A batch of
    version 1 that commits while the switch goes on (the switch had read version 1's
    position without a lock) served a deposit from version 1, then reads switched to
    version 2 without it: the balance a client had read (105 at position 3) went back
    (100 at position 2). The switch holds version 1's row while it compares; that batch
    waits, finds version 1 retired, and lets go of it."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    ledger.deposit(account, 100)
    log = event_log_of(ledger)
    old = ProjectionRunner(log, pg_url, [ACCOUNT_BALANCES])
    old.run_until_caught_up()
    new = ProjectionRunner(event_log_of(ledger), pg_url, [ACCOUNT_BALANCES_V2])
    outcomes, threads, seen = _a_v1_batch_as_reads_switch(pg_url, ledger, account, old, monkeypatch)
    outcome_of(outcomes, "new", new.step)  # builds version 2 and switches reads to it
    for thread in threads:
        thread.join(30)
    with ReadModels(pg_url) as reads:
        row = reads.balance(account)
    old.stop(), new.stop(), ledger.close()
    assert outcomes == {"old": "done", "new": "done"}
    assert row is not None and seen
    assert row.as_of_position >= seen[0], (
        f"reads went back from position {seen[0]} to {row.as_of_position} ({row.balance})"
    )
    assert deadlocks_once_all_sessions_ended(pg_url) == 0


def test_a_workers_switch_never_serves_a_version_behind_the_runners_it_replaces(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old code's runner follows version 1, which serves reads; a stream group builds
    version 2 and switches reads to it once its vector has reached the head and it is not
    behind version 1. A batch of version 1 that commits between that comparison and the
    switch's COMMIT would serve a deposit the group has not applied, then reads would switch
    to version 2 without it. The switch holds version 1's row from the comparison on: that
    batch waits, finds version 1 retired, and lets go of it."""
    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    ledger.deposit(account, 100)
    old = ProjectionRunner(event_log_of(ledger), pg_url, [ACCOUNT_BALANCES])
    old.run_until_caught_up()
    worker = StreamApplier(
        pg_url, [ACCOUNT_BALANCES_V2], group="g", topic="t", partitions=1, writer="w"
    )
    outcomes, threads, seen = _a_v1_batch_as_reads_switch(pg_url, ledger, account, old, monkeypatch)
    messages = Stream(1).publish(ledger)
    outcome_of(outcomes, "worker", lambda: worker.apply(messages))  # in: switches reads
    for thread in threads:
        thread.join(30)
    with ReadModels(pg_url) as reads:
        row = reads.balance(account)
    worker.close(), old.stop(), ledger.close()
    assert outcomes == {"old": "done", "worker": "done"}
    assert row is not None and seen
    assert row.version == 2
    assert row.as_of_position >= seen[0], (
        f"reads went back from position {seen[0]} to {row.as_of_position} ({row.balance})"
    )
    assert deadlocks_once_all_sessions_ended(pg_url) == 0


def test_a_repair_and_a_batch_of_the_owning_stream_group_never_deadlock(pg_url: str) -> None:
    """A worker's batch locks its partitions' progress rows, then the version's catalog row
    FOR SHARE. ``reconcile --repair`` of that version locked the catalog row first, then the
    progress rows: a deadlock, and a repair that failed (or a batch that was lost)."""
    ledger = open_ledger(pg_url)
    accounts = [ledger.open_account(f"owner-{n}", "EUR").account_id for n in range(4)]
    for account in accounts:
        ledger.deposit(account, 100)
    stream, outcomes, threads = Stream(1), {}, []
    worker = StreamApplier(
        pg_url, [ACCOUNT_BALANCES], group="g", topic="t", partitions=1, writer="w"
    )
    worker.apply(stream.publish(ledger))  # built, and serving
    worker.connect().execute(
        f"UPDATE {BALANCES.physical_name(1)} SET balance = balance + 1 WHERE account_id = %s",
        (str(accounts[0]),),
    )  # a drift for the repair to repair
    ledger.deposit(accounts[1], 5)
    batch, log = stream.publish(ledger), event_log_of(ledger)
    lock_progress = worker._lock_progress

    def progress_then_repair(*args: Any) -> Any:
        progress = lock_progress(*args)  # the batch holds its progress row
        repair = in_thread(
            outcomes, "repair", lambda: reconcile(log, pg_url, ACCOUNT_BALANCES, repair=True)
        )
        threads.append(repair)
        wait_for_lock_waits(pg_url, 1, "the repair")
        return progress  # the batch goes on to the catalog row

    worker._lock_progress = progress_then_repair  # type: ignore[method-assign]
    outcome_of(outcomes, "worker", lambda: worker.apply(batch))
    for thread in threads:
        thread.join(60)
    worker.close()
    report = reconcile(log, pg_url, ACCOUNT_BALANCES)
    ledger.close()
    assert outcomes == {"worker": "done", "repair": "done"}
    assert report.clean, report.drifts
    assert deadlocks_once_all_sessions_ended(pg_url) == 0


def test_a_switch_building_its_keys_holds_up_no_one_connecting(pg_url: str) -> None:
    """The runner switches a new version to serve; building the append-only table's key
    takes as long as the table is large. A writer connecting meanwhile registers its
    versions (the DDL lock, then the version's row), and a reader connecting checks the
    catalog (the DDL lock). Built while the switch held the version's row, the key kept the
    writer waiting with the DDL lock held, and every connecting reader behind it, for the
    whole build."""
    ledger = open_ledger(pg_url)
    for n in range(4):
        ledger.deposit(ledger.open_account(f"owner-{n}", "EUR").account_id, 100)
    runner = ProjectionRunner(event_log_of(ledger), pg_url, [ACCOUNT_STATEMENT])
    store, outcomes = runner._connect(), {}
    build = store.create_unique_index
    finished: dict[str, bool] = {}
    threads: list[threading.Thread] = []

    def register() -> None:
        other = open_store(pg_url)
        try:
            VersionCatalog(other).register(ACCOUNT_STATEMENT)
        finally:
            other.close()

    def read() -> None:
        with ReadModels(pg_url) as reads, contextlib.suppress(StaleRead):
            reads.position("account_statement")  # none serves yet: StaleRead, at once

    def build_while_others_connect(*args: Any) -> None:
        build(*args)  # as far as the others can tell, mid-build: its locks are held
        threads.append(in_thread(outcomes, "writer", register))
        finished["writer"] = waits_or_finishes(pg_url, threads[-1], 1)
        threads.append(in_thread(outcomes, "reader", read))
        finished["reader"] = waits_or_finishes(pg_url, threads[-1], 1 + (not finished["writer"]))

    store.create_unique_index = build_while_others_connect  # type: ignore[method-assign]
    runner.run_until_caught_up()  # builds, then switches
    for thread in threads:
        thread.join(30)
    runner.stop(), ledger.close()
    assert finished["writer"] and finished["reader"], f"waited for the build: {finished}"
    assert outcomes["writer"] == outcomes["reader"] == "done"


def test_a_repair_that_postgresql_aborts_to_break_a_deadlock_runs_again(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handover locks a version's catalog row before its group's progress rows; a repair
    of that version locks them the other way round, as the group's workers do. When
    PostgreSQL breaks that cycle by aborting the repair, the repair, which wrote nothing,
    compares again and repairs: ``daybook reconcile --repair`` does not fail on it."""
    ledger = open_ledger(pg_url)
    accounts = [ledger.open_account(f"owner-{n}", "EUR").account_id for n in range(4)]
    for account in accounts:
        ledger.deposit(account, 100)
    worker = StreamApplier(
        pg_url, [ACCOUNT_BALANCES], group="g", topic="t", partitions=1, writer="w"
    )
    worker.apply(Stream(1).publish(ledger))
    worker.connect().execute(
        f"UPDATE {BALANCES.physical_name(1)} SET balance = balance + 1 WHERE account_id = %s",
        (str(accounts[0]),),
    )
    worker.close()
    locked_point = reconcile_module._locked_point
    aborted: list[bool] = []

    def aborted_once(*args: Any) -> Any:
        if not aborted:
            aborted.append(True)
            raise DeadlockDetected("deadlock detected")
        return locked_point(*args)

    monkeypatch.setattr(reconcile_module, "_locked_point", aborted_once)
    log = event_log_of(ledger)
    report = reconcile(log, pg_url, ACCOUNT_BALANCES, repair=True)
    assert aborted and report.repaired
    assert reconcile(log, pg_url, ACCOUNT_BALANCES).clean
    ledger.close()


def test_workers_of_a_group_on_different_partitions_never_wait_for_each_other(
    pg_url: str,
) -> None:
    """Workers scale out: worker A's batch of partition 0 is written, the day's money total
    among its rows, and its COMMIT not yet sent; worker B's batch of partition 1, deposits
    of the same day and currency, commits meanwhile. A lock shared by the group, or one
    daily row that both write, would keep B waiting until A commits."""
    ledger = open_ledger(pg_url)
    partition = partition_of(2)
    accounts: list[UUID] = []
    while len({partition(str(account)) for account in accounts}) < 2 or len(accounts) < 8:
        accounts.append(ledger.open_account(f"owner-{len(accounts)}", "EUR").account_id)
    for account in accounts:
        ledger.deposit(account, 100)
    stream = Stream(2)
    first = stream.publish(ledger)
    a, b = (
        StreamApplier(pg_url, projections.ALL, group="g", topic="t", partitions=2, writer=w)
        for w in "ab"
    )
    a.apply(of_partitions(first, 0))
    b.apply(of_partitions(first, 1))  # every event in: the group's versions serve
    for account in accounts:
        ledger.deposit(account, 1)
    later = stream.publish(ledger)
    outcomes: dict[str, str] = {}
    b_finished: list[bool] = []
    threads: list[threading.Thread] = []
    save = a._save_progress

    def save_then_batch_of_b(*args: Any) -> None:
        save(*args)  # A's rows and progress written; its COMMIT is next
        threads.append(in_thread(outcomes, "b", lambda: b.apply(of_partitions(later, 1))))
        b_finished.append(waits_or_finishes(pg_url, threads[0], 1))

    a._save_progress = save_then_batch_of_b  # type: ignore[method-assign]
    outcome_of(outcomes, "a", lambda: a.apply(of_partitions(later, 0)))
    for thread in threads:
        thread.join()  # (a B that waited goes on once A has committed)
    a.close(), b.close()
    assert outcomes == {"a": "done", "b": "done"}
    assert b_finished == [True], "worker B waited for a lock that worker A held"
    for projection in projections.ALL:
        assert_tables_match(ledger, pg_url, projection)
    ledger.close()
