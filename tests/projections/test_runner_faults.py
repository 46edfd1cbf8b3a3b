"""The in-process runner killed between writing rows and COMMIT, and cut off from the event
store for ten seconds in the middle of a log read: nothing lost, nothing applied twice."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from daybook import Ledger, open_ledger, projections
from daybook.infrastructure.bootstrap import event_log_of, projection_runner
from daybook.infrastructure.cli import main
from daybook.infrastructure.lifecycle import Health, ServiceState
from daybook.infrastructure.observability import metrics
from daybook.infrastructure.readmodels import queries
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionState
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.queries import ReadModels
from daybook.infrastructure.readmodels.rebuild import RebuildResult, rebuild
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.infrastructure.settings import Settings
from daybook.infrastructure.streaming import faults
from daybook.infrastructure.transient import is_transient
from daybook.projections.accounts import BALANCES, STATEMENT
from daybook.projections.model import Projection
from scripts import services
from scripts.outage import Outage
from scripts.streams import WAIT, Daybook, unique, wait_until
from tests.projections.helpers import assert_tables_match, workload
from tests.projections.test_rebuild_reconcile import ACCOUNT_BALANCES_V2, ALL_V2

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

OUTAGE_SECONDS = 10.0


@pytest.fixture
def ledger(pg_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(pg_url)
    yield ledger
    ledger.close()


def positions(url: str) -> dict[str, int]:
    """Each projection's position ({} before a runner made its catalog)."""
    store = open_store(url)
    try:
        return {r.name: r.position for r in VersionCatalog(store).versions()}
    except psycopg.errors.UndefinedTable:
        return {}
    finally:
        store.close()


def project(url: str, log: Path, faults_spec: str = "") -> Daybook:
    args = ["project", "--url", url, "--batch-size", "50", "--poll-interval", "0.05"]
    env = {"DAYBOOK_FAULTS": faults_spec} if faults_spec else {}
    return Daybook(args, log, env=env, module="daybook.infrastructure.cli")


def test_a_runner_killed_between_writing_rows_and_commit_loses_and_repeats_nothing(
    ledger: Ledger, pg_url: str, tmp_path: Path
) -> None:
    workload(ledger, 300)
    doomed = project(pg_url, tmp_path / "doomed.log", "runner.before_commit:3").start()
    assert doomed.wait() == -9, doomed.output
    assert "fault point runner.before_commit: SIGKILL" in doomed.output
    # Two batches of 50 committed; the third's rows were written and never committed.
    assert set(positions(pg_url).values()) == {100}
    again = project(pg_url, tmp_path / "again.log").start()
    try:
        head = ledger.head()
        wait_until(lambda: set(positions(pg_url).values()) == {head}, "the restarted runner")
    finally:
        assert again.stop() == 0, again.output
    assert "fault point" not in again.output
    for projection in projections.ALL:
        assert_tables_match(ledger, pg_url, projection)


def test_the_event_store_gone_for_ten_seconds_mid_log_read_stops_nothing(
    ledger: Ledger, pg_url: str, pg_admin_url: str, tmp_path: Path
) -> None:
    """Read models on another database; the event store unreachable from the runner for ten
    seconds, starting inside a log read; commands keep arriving meanwhile."""
    ids = workload(ledger, 100)
    readmodels = new_read_models(pg_admin_url)
    with Outage.of_url(pg_url) as outage:
        faults.arm("log.read:4:pause", tmp_path)
        runner = projection_runner(
            Settings(url=outage.url(pg_url), readmodels_url=readmodels), poll_interval=0.05
        )
        runner.start()
        try:
            marker = faults.paused_file("log.read", tmp_path)
            wait_until(marker.exists, "the runner to reach its fourth log read")
            outage.cut()
            marker.unlink()  # the read goes on, into the outage
            workload(ledger, 60, seed=2, accounts=ids)
            time.sleep(OUTAGE_SECONDS)
            assert runner.health().state is not ServiceState.FAILED, runner.health()
            outage.restore()
            head = ledger.head()
            wait_until(
                lambda: set(positions(readmodels).values()) == {head}, "the runner to catch up"
            )
            assert runner.health().state is ServiceState.RUNNING, runner.health()
        finally:
            faults.disarm()
            runner.stop()
    for projection in projections.ALL:
        assert_tables_match(ledger, readmodels, projection)


#: The read-model outages below last a few seconds, not ten: the runner has no timer that an
#: outage's length could outlast (every failed attempt is judged transient, and the backoff
#: stops growing at its ceiling), so what a test must show is where the outage starts.
READ_MODEL_OUTAGE_SECONDS = 2.5

#: Table writes in one batch that every projection takes part in.
TABLES_PER_BATCH = sum(len(projection.tables) for projection in projections.ALL)


@pytest.mark.parametrize(
    ("point", "commit_lands"),
    [
        # In the second batch, after some of its rows are written and before the rest.
        (f"rows.write:{TABLES_PER_BATCH + 2}", False),
        # The second batch written and its positions moved; COMMIT is next (and lost).
        ("runner.before_commit:2", False),
        # The same, but the COMMIT reaches the server and its reply is lost: the runner
        # cannot tell whether the batch is in.
        ("runner.before_commit:2", True),
    ],
    ids=["mid-apply", "at-commit", "commit-reply-lost"],
)
def test_the_read_model_database_gone_mid_batch_stops_nothing(
    point: str,
    commit_lands: bool,
    ledger: Ledger,
    pg_url: str,
    pg_admin_url: str,
    tmp_path: Path,
) -> None:
    """Read models on another database, which alone goes away (the event store stays) while
    the runner is inside a read-model transaction: writing a batch's rows, about to commit
    it, or waiting for the reply to its COMMIT. The runner retries by itself; a batch rolled
    back is written again once, a batch committed is not written again, so the tables
    equal a replay of the whole log."""
    ids = workload(ledger, 150)
    readmodels = new_read_models(pg_admin_url)
    name = point.partition(":")[0]
    with Outage.of_url(readmodels) as outage:
        faults.arm(f"{point}:pause", tmp_path)
        runner = projection_runner(
            Settings(url=pg_url, readmodels_url=outage.url(readmodels)),
            poll_interval=0.05,
            batch_size=50,
        )
        runner.start()
        try:
            marker = faults.paused_file(name, tmp_path)
            wait_until(marker.exists, f"the runner to reach {point}")
            if commit_lands:
                outage.cut_after_next_request()
            else:
                outage.cut()
            marker.unlink()  # the transaction goes on, into the outage
            workload(ledger, 60, seed=2, accounts=ids)
            met_the_outage(runner.health)
            time.sleep(READ_MODEL_OUTAGE_SECONDS)  # and stays up through it
            health = runner.health()
            assert health.state is not ServiceState.FAILED, health
            # Two batches of 50 in the database if the second one's COMMIT landed, else one.
            assert set(positions(readmodels).values()) == {100 if commit_lands else 50}
            outage.restore()
            head = ledger.head()
            wait_until(
                lambda: set(positions(readmodels).values()) == {head}, "the runner to catch up"
            )
            assert runner.health().state is ServiceState.RUNNING, runner.health()
        finally:
            faults.disarm()
            runner.stop()
    for projection in projections.ALL:
        assert_tables_match(ledger, readmodels, projection)


def test_the_read_model_database_gone_during_start_up_stops_nothing(
    ledger: Ledger, pg_url: str, pg_admin_url: str, tmp_path: Path
) -> None:
    """Read models on another database, which goes away while the runner starts: its
    catalog made, its versions not yet registered. The runner retries its start-up by itself
    and then builds every projection from the log."""
    ids = workload(ledger, 150)
    readmodels = new_read_models(pg_admin_url)
    with Outage.of_url(readmodels) as outage:
        faults.arm("runner.connect:1:pause", tmp_path)
        runner = projection_runner(
            Settings(url=pg_url, readmodels_url=outage.url(readmodels)),
            poll_interval=0.05,
            batch_size=50,
        )
        runner.start()
        try:
            marker = faults.paused_file("runner.connect", tmp_path)
            wait_until(marker.exists, "the runner's start-up")
            outage.cut()
            marker.unlink()  # the start-up goes on, into the outage
            workload(ledger, 60, seed=2, accounts=ids)
            met_the_outage(runner.health)
            time.sleep(READ_MODEL_OUTAGE_SECONDS)  # and stays up through it
            health = runner.health()
            assert health.state is not ServiceState.FAILED, health
            outage.restore()
            head = ledger.head()
            names = {projection.name for projection in projections.ALL}
            wait_until(
                lambda: positions(readmodels) == dict.fromkeys(names, head),
                "the runner to build every projection",
            )
            assert runner.health().state is ServiceState.RUNNING, runner.health()
        finally:
            faults.disarm()
            runner.stop()
    for projection in projections.ALL:
        assert_tables_match(ledger, readmodels, projection)


@pytest.mark.parametrize("commit_lands", [False, True], ids=["switch-lost", "reply-lost"])
def test_the_read_model_database_gone_at_a_switch_of_reads_stops_nothing(
    commit_lands: bool, ledger: Ledger, pg_url: str, pg_admin_url: str, tmp_path: Path
) -> None:
    """Version 1 of every projection built and serving; a runner whose code has version 2
    of account_balances builds it beside version 1 and, at the end of the log, switches
    reads to it. The read-model database goes away in that switch's transaction, before its
    COMMIT (lost) or after it (carried out, the reply lost). The runner goes on: reads end
    up on version 2, built from the whole log; version 1 is retired and its tables are
    dropped, as after a switch without an outage."""
    ids = workload(ledger, 150)
    readmodels = new_read_models(pg_admin_url)
    run_to_head(ledger, readmodels, projections.ALL)
    with Outage.of_url(readmodels) as outage:
        faults.arm("runner.switch:1:pause", tmp_path)
        runner = projection_runner(
            Settings(url=pg_url, readmodels_url=outage.url(readmodels)),
            projections=ALL_V2,
            poll_interval=0.05,
            batch_size=50,
        )
        runner.start()
        try:
            cut_in_the_switch(outage, readmodels, tmp_path, commit_lands=commit_lands)
            workload(ledger, 60, seed=2, accounts=ids)
            met_the_outage(runner.health)
            time.sleep(READ_MODEL_OUTAGE_SECONDS)  # and stays up through it
            health = runner.health()
            assert health.state is not ServiceState.FAILED, health
            outage.restore()
            head = ledger.head()
            wait_until(
                lambda: (
                    active_version(readmodels) == 2 and positions_of(readmodels, ALL_V2) == {head}
                ),
                "the runner to catch up on version 2",
            )
        finally:
            faults.disarm()
            runner.stop()
    store = open_store(readmodels)
    try:
        catalog = VersionCatalog(store)
        retired = catalog.version("account_balances", 1)
        assert retired is not None and retired.state is VersionState.RETIRED
        kept = store.execute("SELECT to_regclass(%s)", (BALANCES.physical_name(1),))[0][0]
        assert kept is None, "version 1's table was kept"
    finally:
        store.close()
    for projection in ALL_V2:
        assert_tables_match(ledger, readmodels, projection)


def met_the_outage(health_of: Callable[[], Health]) -> None:
    """Wait until a runner has failed on the outage and is retrying (or has restarted)."""

    def met() -> bool:
        health = health_of()
        return health.state is ServiceState.RETRYING or health.restarts >= 1

    wait_until(met, "the runner to meet the outage")


def rebuild_in_background(
    ledger: Ledger, url: str
) -> tuple[threading.Thread, list[RebuildResult], list[BaseException]]:
    """``daybook projections rebuild`` of account_balances version 2 in a thread of its own:
    the thread, and what the rebuild returned or raised once it ends."""
    results: list[RebuildResult] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(
                rebuild(
                    event_log_of(ledger), url, ACCOUNT_BALANCES_V2, batch_size=50, progress=False
                )
            )
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    return thread, results, errors


def new_read_models(pg_admin_url: str) -> str:
    """A read-model database of its own (another than the event store's)."""
    return services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))


def run_to_head(
    ledger: Ledger, readmodels: str, definitions: Sequence[Projection], **options: Any
) -> None:
    """A runner with ``definitions`` applies the whole log (switching reads if it builds a
    newer version), then stops."""
    runner = ProjectionRunner(
        event_log_of(ledger), readmodels, definitions, batch_size=500, **options
    )
    runner.run_until_caught_up()
    runner.stop()


def cut_in_the_switch(
    outage: Outage, readmodels: str, tmp_path: Path, *, commit_lands: bool
) -> None:
    """With a switch of reads to version 2 paused at ``runner.switch`` (armed by the
    caller): cut the read-model database before the switch's COMMIT, or (``commit_lands``)
    just after it, with its reply lost; let the switch go on into the outage, and check the
    switch is in exactly when its COMMIT got through."""
    marker = faults.paused_file("runner.switch", tmp_path)
    wait_until(marker.exists, "the switch of reads to version 2")
    if commit_lands:
        outage.cut_after_next_request()
    else:
        outage.cut()
    marker.unlink()  # the switch goes on, into the outage
    wait_until(lambda: outage.cuts == 1, "the cut")
    if commit_lands:  # the server may finish the COMMIT after the cut
        wait_until(lambda: active_version(readmodels) == 2, "the switch to land")
    assert (active_version(readmodels) == 2) is commit_lands


def active_version(url: str) -> int | None:
    store = open_store(url)
    try:
        return VersionCatalog(store).active_version("account_balances")
    finally:
        store.close()


def positions_of(url: str, definitions: Sequence[Projection]) -> set[int]:
    store = open_store(url)
    try:
        catalog = VersionCatalog(store)
        records = [catalog.version(p.name, p.version) for p in definitions]
        return {r.position if r is not None else -1 for r in records}
    finally:
        store.close()


def test_a_runner_started_while_the_event_store_is_gone_waits_for_it(
    ledger: Ledger, pg_url: str, tmp_path: Path
) -> None:
    """``daybook project`` started during an outage of the event store (a host restarting
    with its database, say) waits for it, saying so, then builds every projection: it
    neither exits nor needs restarting."""
    workload(ledger, 60)
    with Outage.of_url(pg_url) as outage:
        outage.cut()
        runner = project(outage.url(pg_url), tmp_path / "project.log").start()
        try:
            wait_until(lambda: "waiting at start" in runner.output, "the runner to say it waits")
            time.sleep(2)  # and stays up through the outage
            assert runner.proc is not None and runner.proc.poll() is None, runner.output
            outage.restore()
            head = ledger.head()
            names = {projection.name for projection in projections.ALL}
            wait_until(
                lambda: positions(pg_url) == dict.fromkeys(names, head),
                "the runner to build every projection",
            )
            assert "answers now" in runner.output
        finally:
            assert runner.stop() == 0, runner.output
    for projection in projections.ALL:
        assert_tables_match(ledger, pg_url, projection)


@pytest.mark.parametrize("commit_lands", [False, True], ids=["switch-lost", "reply-lost"])
def test_a_rebuild_waits_out_the_read_model_database_gone_at_its_switch(
    commit_lands: bool, ledger: Ledger, pg_admin_url: str, tmp_path: Path
) -> None:
    """``daybook projections rebuild`` of account_balances version 2 beside version 1 (read
    models on another database), which goes away in the rebuild's switch of reads: before
    its COMMIT (lost) or after it (carried out, the reply lost). The rebuild waits the
    outage out and finishes: reads on version 2, built from the whole log, version 1
    retired and its tables dropped."""
    workload(ledger, 150)
    readmodels = new_read_models(pg_admin_url)
    run_to_head(ledger, readmodels, projections.ALL)
    with Outage.of_url(readmodels) as outage:
        faults.arm("runner.switch:1:pause", tmp_path)
        builder, results, errors = rebuild_in_background(ledger, outage.url(readmodels))
        try:
            cut_in_the_switch(outage, readmodels, tmp_path, commit_lands=commit_lands)
            time.sleep(READ_MODEL_OUTAGE_SECONDS)
            assert builder.is_alive() and not errors, errors  # it waits, it did not give up
            outage.restore()
            builder.join(WAIT)
        finally:
            faults.disarm()
            builder.join(WAIT)
    assert not errors and results, errors
    assert results[0].previous_version == 1 and results[0].position == ledger.head()
    assert active_version(readmodels) == 2
    store = open_store(readmodels)
    try:
        retired = VersionCatalog(store).version("account_balances", 1)
        assert retired is not None and retired.state is VersionState.RETIRED
        kept = store.execute("SELECT to_regclass(%s)", (BALANCES.physical_name(1),))[0][0]
        assert kept is None, "version 1's table was kept"
    finally:
        store.close()
    assert_tables_match(ledger, readmodels, ACCOUNT_BALANCES_V2)


def test_a_rebuild_started_while_the_read_model_database_is_gone_waits_for_it(
    ledger: Ledger, pg_admin_url: str
) -> None:
    """``daybook projections rebuild`` started during an outage of the read-model database
    (its checks before building cannot reach it) waits the outage out, then builds and
    switches as usual; it neither gives up nor builds on a guess."""
    workload(ledger, 100)
    readmodels = new_read_models(pg_admin_url)
    with Outage.of_url(readmodels) as outage:
        outage.cut()
        builder, results, errors = rebuild_in_background(ledger, outage.url(readmodels))
        try:
            time.sleep(READ_MODEL_OUTAGE_SECONDS)
            assert builder.is_alive() and not errors, errors  # it waits, it did not give up
            outage.restore()
            builder.join(WAIT)
        finally:
            builder.join(WAIT)
    assert not errors and results, errors
    assert results[0].position == ledger.head() and results[0].resumed_from == 0
    assert active_version(readmodels) == 2
    assert_tables_match(ledger, readmodels, ACCOUNT_BALANCES_V2)


def table_exists(url: str, name: str) -> bool:
    store = open_store(url)
    try:
        return store.execute("SELECT to_regclass(%s)", (name,))[0][0] is not None
    finally:
        store.close()


def test_a_switch_of_reads_never_waits_for_a_long_read_of_the_old_version(
    ledger: Ledger, pg_admin_url: str
) -> None:
    """A transaction reading version 1's table (a slow report, a reconcile) stays open while
    a runner switches reads to version 2. Dropping version 1's tables waits for that
    reader; were the drop in the switch's transaction, the catalog would stay locked with
    it and every new read of the projection would queue behind the slow one. The switch
    commits, new reads answer from version 2 at once, and the drop comes when the slow
    reader is done (here: when a runner next connects)."""
    ids = workload(ledger, 100)
    readmodels = new_read_models(pg_admin_url)
    run_to_head(ledger, readmodels, projections.ALL)
    slow = psycopg.connect(readmodels, autocommit=True)
    try:
        slow.execute("BEGIN")
        slow.execute(f"SELECT count(*) FROM {BALANCES.physical_name(1)}").fetchone()
        switching = ProjectionRunner(event_log_of(ledger), readmodels, ALL_V2, batch_size=500)
        switched = threading.Thread(target=switching.run_until_caught_up, daemon=True)
        switched.start()
        wait_until(lambda: active_version(readmodels) == 2, "the switch to version 2")
        answers: list[object] = []
        reader = ReadModels(readmodels)
        asking = threading.Thread(
            target=lambda: answers.append(reader.balance(ids[0], timeout=WAIT)), daemon=True
        )
        asking.start()
        wait_until(lambda: bool(answers), "a read while the slow reader holds version 1")
        assert answers[0] is not None
        switched.join(WAIT)
        assert not switched.is_alive(), "the runner waited on the slow reader"
        assert table_exists(readmodels, BALANCES.physical_name(1))  # still being read
        switching.stop()
        reader.close()
    finally:
        slow.close()
    run_to_head(ledger, readmodels, ALL_V2)
    assert not table_exists(readmodels, BALANCES.physical_name(1))
    for projection in ALL_V2:
        assert_tables_match(ledger, readmodels, projection)


def test_tables_kept_on_request_stay_whoever_runs_next(ledger: Ledger, pg_admin_url: str) -> None:
    """``--keep-old`` is recorded with the switch (its tables are not marked to drop): version
    1's tables stay, also when a runner without the option connects later (which drops what
    a switch marked and left behind). Versions retired by code that did not mark them are
    the same case: whether they were kept is not known, so they stay."""
    workload(ledger, 60)
    readmodels = new_read_models(pg_admin_url)
    run_to_head(ledger, readmodels, projections.ALL)
    run_to_head(ledger, readmodels, ALL_V2, keep_old=True)
    assert active_version(readmodels) == 2
    run_to_head(ledger, readmodels, ALL_V2)
    assert table_exists(readmodels, BALANCES.physical_name(1))
    store = open_store(readmodels)
    try:
        retired = VersionCatalog(store).version("account_balances", 1)
        assert retired is not None and retired.state is VersionState.RETIRED
        assert retired.note is None  # the catalog's notes say nothing of it
    finally:
        store.close()


def test_tables_kept_on_request_are_dropped_on_request(
    ledger: Ledger, pg_url: str, pg_admin_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``daybook projections drop NAME VERSION`` drops a retired version's tables that a
    switch kept (``--keep-old``); nothing else did, so they stayed for good. Any version
    that is not retired (it serves reads, is being built, or may be resumed) is refused,
    and nothing is dropped."""
    workload(ledger, 60)
    readmodels = new_read_models(pg_admin_url)
    run_to_head(ledger, readmodels, projections.ALL)
    run_to_head(ledger, readmodels, ALL_V2, keep_old=True)
    urls = ["--url", pg_url, "--readmodels-url", readmodels]
    capsys.readouterr()
    assert main(["projections", "drop", "account_balances", "2", *urls]) == 1
    refused = capsys.readouterr().err
    assert "cannot drop the tables of a live version" in refused, refused
    assert "Traceback" not in refused
    assert main(["projections", "drop", "account_balances", "7", *urls]) == 1
    assert "has no version 7" in capsys.readouterr().err
    assert table_exists(readmodels, BALANCES.physical_name(2))
    assert table_exists(readmodels, BALANCES.physical_name(1))
    with psycopg.connect(readmodels, autocommit=True) as slow:  # a long report on version 1
        slow.execute("BEGIN")
        slow.execute(f"SELECT count(*) FROM {BALANCES.physical_name(1)}").fetchone()
        drop = ["projections", "drop", "account_balances", "1", *urls]
        assert main([*drop, "--lock-wait", "0.2"]) == 1
        assert "still being read" in capsys.readouterr().err
        assert table_exists(readmodels, BALANCES.physical_name(1))
    assert main(drop) == 0
    assert BALANCES.physical_name(1) in capsys.readouterr().out
    assert not table_exists(readmodels, BALANCES.physical_name(1))
    assert table_exists(readmodels, BALANCES.physical_name(2))
    assert main(["projections", "drop", "account_balances", "1", *urls]) == 0  # again: no-op
    assert "no tables left" in capsys.readouterr().out
    run_to_head(ledger, readmodels, ALL_V2)  # the runner still serves version 2
    assert_tables_match(ledger, readmodels, ACCOUNT_BALANCES_V2)


def test_a_caller_stepping_a_runner_that_follows_in_its_thread_waits_for_its_batch(
    ledger: Ledger, pg_admin_url: str, tmp_path: Path
) -> None:
    """The runner's own thread follows the log while a caller runs it up to the head too
    (``run_until_caught_up``, as a script or a test might). The two share the runner's
    connection and positions: the caller's step waits for the batch in hand (two steps at
    once applied events twice, now and then), and every event is applied once."""
    workload(ledger, 120)
    readmodels = new_read_models(pg_admin_url)
    runner = ProjectionRunner(event_log_of(ledger), readmodels, projections.ALL, batch_size=50)
    faults.arm("runner.before_commit:1:pause", tmp_path)
    try:
        runner.start()
        marker = faults.paused_file("runner.before_commit", tmp_path)
        wait_until(marker.exists, "the runner's first batch to reach its COMMIT")
        caller = threading.Thread(target=runner.run_until_caught_up, daemon=True)
        caller.start()
        caller.join(1.0)
        assert caller.is_alive(), "the caller stepped while the runner's batch was in hand"
        marker.unlink()
        caller.join(WAIT)
        assert not caller.is_alive()
        head = ledger.head()
        wait_until(
            lambda: positions_of(readmodels, projections.ALL) == {head}, "the runner at the head"
        )
    finally:
        faults.disarm()
        runner.stop()
    for projection in projections.ALL:
        assert_tables_match(ledger, readmodels, projection)


def test_a_serving_version_without_its_keys_gets_them_from_the_next_runner(
    ledger: Ledger, pg_admin_url: str
) -> None:
    """A version an older daybook switched to (which built no deferred keys) serves without
    its statement's key; the next runner to take it builds the key."""
    workload(ledger, 60)
    readmodels = new_read_models(pg_admin_url)
    run_to_head(ledger, readmodels, projections.ALL)
    statement = STATEMENT.physical_name(1)
    store = open_store(readmodels)
    try:
        with store.transaction():
            store.execute(f"DROP INDEX {statement}_key")
        assert not store.has_unique_key(statement)
        run_to_head(ledger, readmodels, projections.ALL)
        assert store.has_unique_key(statement)
    finally:
        store.close()


def test_a_runner_whose_database_refuses_it_for_good_stops_with_the_reason(
    ledger: Ledger, pg_url: str, pg_admin_url: str
) -> None:
    """The read models' role loses its right to log in while the runner runs. The server
    answers each new connection with a refusal no retry changes: the runner stops (health
    ``FAILED``, the server's words as the reason) instead of retrying for ever."""
    role = unique("daybook_role").replace("-", "_")
    readmodels = new_read_models(pg_admin_url)
    name = readmodels.rpartition("/")[2]
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"ALTER DATABASE {name} OWNER TO {role}")  # and its public schema
    as_role = readmodels.replace("postgres@", f"{role}@", 1)
    assert as_role != readmodels
    workload(ledger, 20)
    runner = projection_runner(Settings(url=pg_url, readmodels_url=as_role), poll_interval=0.05)
    runner.start()
    try:
        head = ledger.head()

        def caught_up() -> bool:
            try:
                return set(positions(readmodels).values()) == {head}
            except psycopg.errors.UndefinedTable:
                return False  # the runner has not made its catalog yet

        wait_until(caught_up, "the runner to catch up")
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f"ALTER ROLE {role} NOLOGIN")
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
        workload(ledger, 20, seed=2)
        wait_until(lambda: runner.health().state is ServiceState.FAILED, "the runner to stop")
        assert "is not permitted to log in" in str(runner.health().error)
    finally:
        runner.stop()
        services.drop_database(pg_admin_url, name)
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("closed_before", [False, True], ids=["new", "closed and used again"])
def test_a_read_waits_out_the_read_model_database_gone_past_a_few_reconnects(
    ledger: Ledger, pg_admin_url: str, monkeypatch: pytest.MonkeyPatch, closed_before: bool
) -> None:
    """A query while the read-model database refuses connections (a PostgreSQL restart)
    reconnects with backoff until it is back, however many attempts that takes, and then
    answers. It gave up after three immediate reconnects, and ``daybook serve`` answered
    such a read ``500 internal_error`` with a traceback in its log. A ``ReadModels`` closed
    and queried again (it reconnects) waits the same way: closing stops only the reads
    under way."""
    ids = workload(ledger, 40)
    readmodels = new_read_models(pg_admin_url)
    run_to_head(ledger, readmodels, projections.ALL)
    attempts = _store_opens_counted(monkeypatch)
    with Outage.of_url(readmodels) as outage:
        reader = ReadModels(outage.url(readmodels))
        if closed_before:
            assert reader.balance(ids[0]) is not None
            reader.close()
        answers: list[object] = []
        errors: list[BaseException] = []

        def read() -> None:
            try:
                answers.append(reader.balance(ids[0], timeout=WAIT))
            except BaseException as error:
                errors.append(error)

        outage.cut()
        asking = threading.Thread(target=read, daemon=True)
        asking.start()
        wait_until(lambda: len(attempts) >= 8 or not asking.is_alive(), "eight connection attempts")
        outage.restore()
        asking.join(WAIT)
        reader.close()
    assert not errors, errors
    assert answers and answers[0] is not None


def test_a_read_gives_up_on_an_outage_once_its_timeout_has_passed(
    ledger: Ledger, pg_admin_url: str
) -> None:
    """Waiting out an outage is bounded by the read's timeout: then the outage's own error
    is raised (``daybook serve`` answers it 503 unavailable), rather than the read hanging
    for as long as the database is down."""
    ids = workload(ledger, 10)
    readmodels = new_read_models(pg_admin_url)
    run_to_head(ledger, readmodels, projections.ALL)
    with Outage.of_url(readmodels) as outage:
        reader = ReadModels(outage.url(readmodels))
        assert reader.balance(ids[0]) is not None
        outage.cut()
        outcome: list[BaseException | object] = []

        def read() -> None:
            try:
                outcome.append(reader.balance(ids[0], timeout=0.5))
            except BaseException as error:
                outcome.append(error)

        asking = threading.Thread(target=read, daemon=True)
        asking.start()
        asking.join(WAIT)
        stuck = asking.is_alive()
        outage.restore()
        asking.join(WAIT)
        reader.close()
    assert not stuck, "the read was still waiting long after its timeout"
    assert len(outcome) == 1 and isinstance(outcome[0], Exception), outcome
    assert is_transient(outcome[0]), outcome[0]


def test_a_read_the_statement_timeout_cuts_off_is_tried_again_only_within_its_timeout(
    ledger: Ledger, pg_admin_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read the server cancels (its ``statement_timeout``: here a LOCK TABLE holds the
    table) is an outage's, answered ``503 unavailable``; but each attempt has already taken
    the whole timeout, on a connection that is fine. It was tried four times whatever the
    read's own timeout (a request held for four statement timeouts, the load it met made
    four times over); now again only while the read's timeout allows."""
    ids = workload(ledger, 10)
    readmodels = new_read_models(pg_admin_url)
    run_to_head(ledger, readmodels, projections.ALL)
    _set_by_default(pg_admin_url, readmodels, "statement_timeout", 300)
    attempts = _store_opens_counted(monkeypatch)
    reader = ReadModels(readmodels)
    holder = psycopg.connect(readmodels)
    try:
        assert reader.balance(ids[0]) is not None
        attempts.clear()
        holder.execute("LOCK TABLE rm_account_balances_v1 IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(psycopg.errors.QueryCanceled) as cancelled:
            reader.balance(ids[0], timeout=0.1)
        holder.rollback()
        assert reader.balance(ids[0]) is not None
    finally:
        holder.close()
        reader.close()
    assert is_transient(cancelled.value)  # ``daybook serve``: 503 unavailable
    assert attempts == []  # tried once, on the connection it had (kept for the next read)


def test_a_runner_says_it_runs_again_only_once_it_is_back_at_work_and_its_lag_grows_meanwhile(
    ledger: Ledger, pg_url: str, pg_admin_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Through an outage of the read-model database, each attempt to reconnect said
    ``recovered``, counted a restart and made health ``running`` (so ``/health`` ok) until
    it failed again. Now the runner stays ``retrying`` through every attempt, and says it
    recovered once, when a batch gets through. Meanwhile its lag gauges froze at their
    last value (0): they now grow with the log."""
    workload(ledger, 20)
    readmodels = new_read_models(pg_admin_url)
    caplog.set_level(logging.INFO, logger="daybook.services")
    with Outage.of_url(readmodels) as outage:
        runner = projection_runner(
            Settings(url=pg_url, readmodels_url=outage.url(readmodels)), poll_interval=0.05
        )
        runner.start()
        try:
            head = ledger.head()
            wait_until(lambda: set(positions(readmodels).values()) == {head}, "the first build")
            outage.cut()
            seen: list[Health] = []

            def attempts() -> int:
                return sum("restarting in" in r.getMessage() for r in caplog.records)

            wait_until(lambda: attempts() >= 1, "the runner to meet the outage")
            wait_until(lambda: seen.append(runner.health()) or attempts() >= 4, "more attempts")
            assert {h.state for h in seen} == {ServiceState.RETRYING}, seen
            assert {h.restarts for h in seen} == {0}, seen
            assert not any("recovered" in r.getMessage() for r in caplog.records)
            # Meanwhile the log grows: the lag gauges say so, rather than freeze at 0.
            built = head
            workload(ledger, 5, seed=3)
            head = ledger.head()
            labels = {
                "projection": "account_balances",
                "version": str(projections.by_name("account_balances").version),
            }

            def lag(name: str) -> float:
                return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

            wait_until(lambda: lag("daybook_projection_lag_events") == head - built, "the lag")
            assert lag("daybook_projection_lag_seconds") > 0
            outage.restore()
            wait_until(lambda: set(positions(readmodels).values()) == {head}, "the catch-up")
            wait_until(lambda: lag("daybook_projection_lag_events") == 0, "no lag")
            health = runner.health()
            assert (health.state, health.restarts) == (ServiceState.RUNNING, 1), health
        finally:
            runner.stop()
    said = [r.getMessage() for r in caplog.records]
    assert said.count("projection runner: recovered (restart 1)") == 1, said


def test_a_standby_runner_says_it_runs_again_after_one_lost_connection(
    ledger: Ledger, pg_url: str
) -> None:
    """A runner standing by (another holds every version's writer lock) has no batch to
    get through: after one lost connection it reconnected, yet stayed ``retrying`` (and
    /health 503) until the other runner died."""
    workload(ledger, 5)
    first = projection_runner(Settings(url=pg_url), poll_interval=0.05)
    standby = projection_runner(Settings(url=pg_url), poll_interval=0.05)
    first.start()
    try:
        wait_until(lambda: first.slots != {}, "the first runner to own the versions")
        standby.start()
        wait_until(lambda: standby._locks is not None, "the standby to connect")
        assert standby.slots == {} and standby.health().state is ServiceState.RUNNING
        pid = standby._locks.conn.info.backend_pid
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # Its ``retrying`` may last a few milliseconds, too short for a poll to be sure to
        # see: a restart is counted when it runs again, which no poll can miss.
        wait_until(
            lambda: (
                standby.health().state is ServiceState.RUNNING and standby.health().restarts >= 1
            ),
            "the standby to run again after the blip",
        )
        assert standby.health().restarts == 1 and standby.slots == {}
    finally:
        standby.stop()
        first.stop()


def test_a_runner_says_it_retries_before_it_cleans_up_after_an_event_store_failure(
    ledger: Ledger, pg_url: str, pg_admin_url: str
) -> None:
    """After a failure the runner cleans up and measures its lag against the log; with the
    event store away, that waited for the store's pool (and its retries) while health
    still said ``running`` and no failure was logged. Health now says it retries first,
    and the measure gives up at once on a store that does not answer."""
    workload(ledger, 10)
    readmodels = new_read_models(pg_admin_url)
    with Outage.of_url(pg_url) as outage:
        proxied = outage.url(pg_url)
        store_url = f"{proxied}{'&' if '?' in proxied else '?'}connect_timeout=2"
        runner = projection_runner(
            Settings(url=store_url, readmodels_url=readmodels), poll_interval=0.05
        )
        seen: list[tuple[ServiceState, object]] = []
        hold = runner._hold_lag

        def observed() -> None:
            seen.append((runner.health().state, runner.log.glance([0], 0.5)))
            hold()

        runner._hold_lag = observed  # type: ignore[method-assign]
        runner.start()
        try:
            head = ledger.head()
            wait_until(lambda: set(positions(readmodels).values()) == {head}, "the build")
            outage.cut()
            wait_until(lambda: len(seen) >= 1, "the first failure's clean-up")
        finally:
            outage.restore()
            runner.stop()
    state, glanced = seen[0]
    assert state is ServiceState.RETRYING
    assert glanced is None  # the store away: no answer, no exception


def test_a_handlers_read_the_database_refuses_fails_the_batch_not_the_event(
    ledger: Ledger, pg_admin_url: str
) -> None:
    """A row read under a handler that the database refuses (here a lock not granted within
    the database's ``lock_timeout``, an operator's VACUUM FULL holding the table) was taken
    for a bad event: retried, parked and the version stopped. It fails the batch, which is
    retried as an outage; nothing is parked."""
    readmodels = new_read_models(pg_admin_url)
    _set_by_default(pg_admin_url, readmodels, "lock_timeout", 500)
    ids = workload(ledger, 20)
    runner = ProjectionRunner(
        event_log_of(ledger), readmodels, [projections.ACCOUNT_BALANCES], cache_limit=0
    )
    holder = psycopg.connect(readmodels)
    try:
        runner.run_until_caught_up()
        workload(ledger, 10, seed=2, accounts=ids)
        holder.execute("LOCK TABLE rm_account_balances_v1 IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(psycopg.errors.LockNotAvailable) as failed:
            runner.step()
        assert is_transient(failed.value)
        holder.rollback()
        runner.let_go()  # as the service does after a failed step
        runner.run_until_caught_up()
    finally:
        holder.close()
        runner.stop()
    record, letters = _balances_and_letters(readmodels)
    assert record is not None and record.state is VersionState.LIVE and letters == 0
    assert_tables_match(ledger, readmodels, projections.ACCOUNT_BALANCES)


@pytest.mark.parametrize(
    "cache_limit",
    [0, 200_000],
    ids=["a handler's read", "the batch's write"],
)
def test_a_statement_cut_off_by_the_statement_timeout_is_retried_and_parks_nothing(
    ledger: Ledger, pg_admin_url: str, cache_limit: int
) -> None:
    """A statement the server cancels (its ``statement_timeout``, here while an operator's
    LOCK TABLE holds the table; or ``pg_cancel_backend``) failed on no data of its own. A
    handler's row read (no row cached) cut off so was taken for a bad event: retried,
    parked and the version stopped, the read model no longer the log's; the batch's write
    cut off so stopped the runner for good. Either way the runner now retries, ``retrying``
    with the reason, and applies everything once the lock is gone; nothing is parked."""
    readmodels = new_read_models(pg_admin_url)
    _set_by_default(pg_admin_url, readmodels, "statement_timeout", 500)
    ids = workload(ledger, 20)
    runner = ProjectionRunner(
        event_log_of(ledger),
        readmodels,
        [projections.ACCOUNT_BALANCES],
        cache_limit=cache_limit,
        poll_interval=0.05,
    )
    holder = psycopg.connect(readmodels)
    seen: list[Health] = []

    def stopped() -> bool:
        return bool(runner.halted) or runner.health().state is ServiceState.FAILED

    def retried_or_stopped() -> bool:
        seen.append(runner.health())
        return stopped() or sum(h.state is ServiceState.RETRYING for h in seen) > 20

    try:
        runner.run_until_caught_up()
        workload(ledger, 10, seed=2, accounts=ids)
        head = ledger.head()
        holder.execute("LOCK TABLE rm_account_balances_v1 IN ACCESS EXCLUSIVE MODE")
        runner.start()
        wait_until(retried_or_stopped, "the runner to retry, or to stop")
        holder.rollback()
        # The runner says ``running`` again once a step went through: just after the
        # COMMIT that made its position visible, so both are waited for.
        wait_until(
            lambda: (
                stopped()
                or (
                    set(positions(readmodels).values()) == {head}
                    and runner.health().state is ServiceState.RUNNING
                )
            ),
            "the runner to apply everything and say it runs, or to stop",
        )
    finally:
        holder.close()
        runner.stop()
    record, letters = _balances_and_letters(readmodels)
    assert not runner.halted, runner.halted
    assert letters == 0
    assert record is not None and record.state is VersionState.LIVE
    reasons = {h.error for h in seen if h.state is ServiceState.RETRYING}
    assert reasons and all("statement timeout" in str(r) for r in reasons), reasons
    assert_tables_match(ledger, readmodels, projections.ACCOUNT_BALANCES)


def _balances_and_letters(readmodels: str) -> tuple[Any, int]:
    """account_balances v1's catalog record, and how many events the read models parked."""
    store = open_store(readmodels)
    try:
        record = VersionCatalog(store).version("account_balances", 1)
        letters = store.execute("SELECT count(*) FROM daybook_dead_letters")[0][0]
    finally:
        store.close()
    return record, int(letters)


def _store_opens_counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URLs the read side opens a store on from now on, one per connection made."""
    attempts: list[str] = []
    real_open_store = queries.open_store

    def counted_open_store(url: str) -> Any:
        attempts.append(url)
        return real_open_store(url)

    monkeypatch.setattr(queries, "open_store", counted_open_store)
    return attempts


def _set_by_default(admin_url: str, database_url: str, setting: str, value: int) -> None:
    """``setting`` for every new session of ``database_url``'s database (as a DBA sets it)."""
    name = database_url.rsplit("/", 1)[1].split("?")[0]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" SET {setting} = {value}')


def test_a_checkpoint_moved_back_under_a_batch_is_not_written_past(tmp_path: Path) -> None:
    """The runner reads a batch of the log after its position, then locks its tracking row
    to write it. If the row has moved back meanwhile (the read models restored from an
    older backup while the runner ran), the batch would land on tables as of that older
    position, and the events in between would never be applied: the version is written
    only from where it stands, the next batch read from there."""
    url = f"sqlite:///{tmp_path}/daybook.db"
    with open_ledger(url) as ledger:
        workload(ledger, 40)
        runner = ProjectionRunner(event_log_of(ledger), url, [projections.ACCOUNT_BALANCES])
        try:
            runner.run_until_caught_up()
            workload(ledger, 40, seed=2)
            apply_batch = runner._apply_batch
            restored: list[int] = []

            def restored_first(store: Any, events: Any, start: int) -> Any:
                if not restored:  # the backup: empty tables at position 0
                    restored.append(start)
                    other = open_store(url)
                    try:
                        with other.transaction():
                            table = BALANCES.physical_name(1)
                            other.execute(f"DELETE FROM {table}")
                            VersionCatalog(other).set_position("account_balances", 1, 0, None)
                    finally:
                        other.close()
                return apply_batch(store, events, start)

            runner._apply_batch = restored_first  # type: ignore[method-assign]
            runner.run_until_caught_up()
            assert restored and restored[0] > 0
            assert_tables_match(ledger, url, projections.ACCOUNT_BALANCES)
        finally:
            runner.stop()
