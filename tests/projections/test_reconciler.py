"""The reconciler at a position: bounded memory, repairs that end in exit 0, business keys."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from daybook import Ledger, open_ledger, projections, run_projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.cli import main
from daybook.infrastructure.readmodels import reconcile as reconcile_module
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.reconcile import reconcile
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.projections import model as projection_model
from daybook.projections.accounts import BALANCES, STATEMENT, STATEMENT_HEADS
from daybook.projections.inventory import LEVELS
from daybook.projections.model import Handler, LogEvent, Projection, Rows
from tests.projections.helpers import assert_tables_match, workload

pytestmark = pytest.mark.postgres


@pytest.fixture
def ledger(pg_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(pg_url)
    yield ledger
    ledger.close()


def test_repair_exits_0_once_everything_is_repaired_and_names_skus(
    ledger: Ledger, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    workload(ledger, 120)
    with run_projections(ledger, pg_url, start=False) as runner:
        runner.run_until_caught_up()
    store = open_store(pg_url)
    store.execute(f"UPDATE {LEVELS.physical_name(1)} SET on_hand = on_hand + 3 WHERE sku = 'SKU-2'")
    store.close()
    assert main(["reconcile", "inventory_levels", "--url", pg_url]) == 1
    assert "SKU-2" in capsys.readouterr().out
    assert main(["reconcile", "--url", pg_url, "--repair"]) == 0
    assert "repaired" in capsys.readouterr().out
    assert main(["reconcile", "--url", pg_url]) == 0
    for projection in projections.ALL:
        assert_tables_match(ledger, pg_url, projection)


def _peak(ledger: Ledger, url: str) -> int:
    runner = ProjectionRunner(event_log_of(ledger), url, projections.ALL, batch_size=5000)
    runner.run_until_caught_up()
    runner.stop()
    projection_model._TIME_TEXT.clear()  # filled anew by each measure, from the same start
    tracemalloc.start()
    try:
        for projection in projections.ALL:
            assert reconcile(event_log_of(ledger), url, projection).clean
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_the_reconcilers_memory_does_not_grow_with_the_log(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scripts.bench_projections import write_log

    # Batches, the row cache and the memo of timestamp texts smaller than in production, so
    # that the small log already fills every bounded structure (the memo filling up was
    # most of what "grew" from a small log to a large one) and the large one is many more
    # batches and cache fills of the same size.
    monkeypatch.setattr(reconcile_module, "FOLD_BATCH", 1_000)
    monkeypatch.setattr(reconcile_module, "FOLD_CACHE", 1_000)
    monkeypatch.setattr(projection_model, "_TIME_TEXT_LIMIT", 500)
    ledger = open_ledger(pg_url)
    try:
        write_log(pg_url, ledger, 10_000, accounts=250, chunk=10_000)
        small = _peak(ledger, pg_url)
        write_log(pg_url, ledger, 90_000, accounts=250, chunk=30_000)
        large = _peak(ledger, pg_url)
    finally:
        ledger.close()
    # Ten times the log, not ten times the memory: what grows is bounded by batch and cache
    # sizes, not by the number of events or rows. (The memo of timestamp texts left
    # unbounded, a leak of about 170 bytes an event, makes the peak 2.3 times the small
    # one; bounded, it is within 10%.)
    print(f"peak {small:,} bytes for a 10,000-event log, {large:,} for 100,000")
    assert large < small * 1.5, (small, large)


def test_the_fold_never_holds_the_lock_the_owner_writes_under(ledger: Ledger, pg_url: str) -> None:
    """The owner moves on while the reconciler folds: the fold catches up without the
    tracking row's lock (the owner's writers could not write meanwhile)."""
    workload(ledger, 60)
    runner = ProjectionRunner(event_log_of(ledger), pg_url, projections.ALL)
    runner.run_until_caught_up()
    workload(ledger, 30, seed=2)
    other = psycopg.connect(pg_url, autocommit=True)
    lock_free: list[bool] = []

    def watched(handler: Handler) -> Handler:
        def handle(event: LogEvent, rows: Rows) -> None:
            if not lock_free:
                runner.run_until_caught_up()  # the owner moves on while the fold runs
            try:
                with other.transaction():
                    other.execute(
                        "SELECT 1 FROM daybook_projection_versions"
                        " WHERE name = 'account_balances' FOR UPDATE NOWAIT"
                    )
                lock_free.append(True)
            except psycopg.errors.LockNotAvailable:
                lock_free.append(False)
            handler(event, rows)

        return handle

    balances = projections.ACCOUNT_BALANCES
    handlers = {name: watched(handler) for name, handler in balances.handlers.items()}
    report = reconcile(
        event_log_of(ledger),
        pg_url,
        Projection(balances.name, balances.version, balances.tables, handlers),
        repair=True,
    )
    runner.stop()
    other.close()
    assert report.clean and report.position == ledger.head()
    assert len(lock_free) > 1 and all(lock_free)


def _drifted_then_the_owner_moves_on(
    ledger: Ledger,
    url: str,
    monkeypatch: pytest.MonkeyPatch,
    projection: Projection,
    table: Any,
) -> list[int]:
    """``projection`` built by a runner, one account's row of ``table`` drifted (+7 to its
    balance); right after the run's first comparison, a deposit to that account applied by
    the owner (a runner started then: it reads the drifted row). The positions compared."""
    ids = workload(ledger, 60)
    log = event_log_of(ledger)
    runner = ProjectionRunner(log, url, [projection])
    runner.run_until_caught_up()
    runner.stop()
    store = open_store(url)
    store.execute(
        f"UPDATE {table.physical_name(projection.version)} SET balance = balance + 7"
        " WHERE account_id = %s",
        (str(ids[0]),),
    )
    store.close()
    compare = reconcile_module._compare
    compared: list[int] = []

    def compare_then_the_owner_moves_on(*args: Any) -> Any:
        report = compare(*args)
        compared.append(report.position)
        if len(compared) == 1:
            ledger.deposit(ids[0], 5)
            owner = ProjectionRunner(log, url, [projection])
            owner.run_until_caught_up()  # reads the drifted row, adds the deposit to it
            owner.stop()
        return report

    monkeypatch.setattr(reconcile_module, "_compare", compare_then_the_owner_moves_on)
    return compared


def test_a_repair_never_writes_a_row_older_than_what_the_owner_applied_meanwhile(
    ledger: Ledger, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler compares at the runner's position and finds a drifted balance; before
    it repairs, the runner applies a deposit to that very account. The repair writes the
    owner's state at its checkpoint (the fold caught up with it): written as folded at the
    first position, the balance would lose the deposit the runner applied."""
    log = event_log_of(ledger)
    compared = _drifted_then_the_owner_moves_on(
        ledger, pg_url, monkeypatch, projections.ACCOUNT_BALANCES, BALANCES
    )
    report = reconcile(log, pg_url, projections.ACCOUNT_BALANCES, repair=True)
    assert_tables_match(ledger, pg_url, projections.ACCOUNT_BALANCES)
    # Repaired at the owner's checkpoint, then compared again from there: nothing more.
    assert report.repaired and len(compared) == 2 and compared[1] > compared[0], compared
    assert report.position == ledger.head()


def test_a_repair_goes_through_while_the_owner_keeps_applying_events(
    ledger: Ledger, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steady writes: the runner applies a batch between every comparison and the repair's
    lock (a comparison of a real table takes seconds, a batch milliseconds). The repair
    compared again each time, gave up after REPAIR_ROUNDS, and the drift stayed for good
    ("the owner kept moving"). It happens, at the owner's checkpoint."""
    from daybook.infrastructure.readmodels import reconcile as reconcile_module
    from daybook.infrastructure.readmodels.runner import ProjectionRunner

    ids = workload(ledger, 60)
    log = event_log_of(ledger)
    runner = ProjectionRunner(log, pg_url, [projections.ACCOUNT_BALANCES])
    runner.run_until_caught_up()
    store = open_store(pg_url)
    store.execute(
        f"UPDATE {BALANCES.physical_name(1)} SET balance = balance + 7 WHERE account_id = %s",
        (str(ids[0]),),
    )
    store.close()
    compare = reconcile_module._compare

    def compare_while_writes_go_on(*args: object) -> object:
        report = compare(*args)
        ledger.deposit(ids[1], 5)  # another account: the drifted row stays drifted
        runner.run_until_caught_up()
        return report

    monkeypatch.setattr(reconcile_module, "_compare", compare_while_writes_go_on)
    report = reconcile(log, pg_url, projections.ACCOUNT_BALANCES, repair=True)
    runner.stop()
    assert report.repaired, "gave up: the owner kept moving"
    assert_tables_match(ledger, pg_url, projections.ACCOUNT_BALANCES)


def test_comparing_drift_in_every_range_reads_the_table_a_bounded_number_of_times(
    ledger: Ledger, pg_url: str
) -> None:
    """Drift spread over the table (an incident that touched every account): the rows of
    the ranges that differ were read range by range, each a full scan of the table hashing
    every row (the range is an md5 of the key, which no index serves): 258 scans for one
    comparison here, as many again to repair, of the stored table and of the fold alike.
    Now one pass for the checksums and one for the rows of every differing range."""
    from scripts.bench_projections import write_log

    write_log(pg_url, ledger, 10_000, accounts=250, chunk=10_000)
    with run_projections(ledger, pg_url, start=False) as runner:
        runner.run_until_caught_up()
    v = projections.ACCOUNT_STATEMENT.version
    name = STATEMENT.physical_name(v)
    store = open_store(pg_url)
    store.execute(f"UPDATE {name} SET balance = balance + 1")

    def scans() -> int:
        store.execute("SELECT pg_stat_clear_snapshot()")
        return int(
            store.execute("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = %s", (name,))[
                0
            ][0]
        )

    before = scans()
    report = reconcile(event_log_of(ledger), pg_url, projections.ACCOUNT_STATEMENT)
    time.sleep(1.0)  # the server publishes table statistics at most once a second
    after = scans()
    store.close()
    assert report.ranges_differing == 256
    assert after - before <= 4, f"{after - before} full scans of {name} for one comparison"


def test_drift_the_owner_carries_into_a_range_that_matched_is_repaired_too(
    ledger: Ledger, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement head drifted (+7). Between the comparison and the repair's lock the owner
    (a runner started since: it reads the head from the table) applies a deposit to that
    account: the new statement entry, in a table whose ranges all matched at the comparison,
    carries the drift. The repair re-read only the ranges that differed then, said
    'repaired', and left the new entry wrong. The run compares again after a repair the
    owner moved during, until a round finds nothing."""
    log = event_log_of(ledger)
    _drifted_then_the_owner_moves_on(
        ledger, pg_url, monkeypatch, projections.ACCOUNT_STATEMENT, STATEMENT_HEADS
    )
    report = reconcile(log, pg_url, projections.ACCOUNT_STATEMENT, repair=True)
    assert report.repaired
    after = reconcile(log, pg_url, projections.ACCOUNT_STATEMENT)
    assert after.clean, [d.describe() for d in after.drifts]
    assert_tables_match(ledger, pg_url, projections.ACCOUNT_STATEMENT)


def test_a_range_reader_left_unfinished_leaves_later_transactions_whole(
    ledger: Ledger, pg_url: str
) -> None:
    """``rows_by_range`` opened a nested transaction in its generator: abandoned inside a
    transaction that ended first (an exception, a break), its later close ran the nested
    ``finally`` after the outer one had reset the depth, and every later transaction on
    that store took itself for nested: no BEGIN, no snapshot, no locks held."""
    from daybook.projections.accounts import BALANCES

    workload(ledger, 20)
    runner = ProjectionRunner(event_log_of(ledger), pg_url, [projections.ACCOUNT_BALANCES])
    runner.run_until_caught_up()
    runner.stop()
    store = open_store(pg_url)
    try:
        ranges = set(store.range_checksums(BALANCES, 1))
        reader = None
        with pytest.raises(RuntimeError), store.transaction():
            reader = store.rows_by_range(BALANCES, 1, ranges)
            next(reader)
            raise RuntimeError("a failure while a range was in hand")
        reader.close()
        with store.transaction():
            first = store.execute("SELECT txid_current()")[0][0]
            second = store.execute("SELECT txid_current()")[0][0]
        assert first == second, "the transaction ran statement by statement (no BEGIN)"
    finally:
        store.close()
