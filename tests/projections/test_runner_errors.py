"""A database error that is the rows' fault stops only the projection that wrote them."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from daybook import Ledger, open_ledger, projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.readmodels.bulk import BulkRunner
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionState
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.rebuild import RebuildError, rebuild
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.projections.model import Column, LogEvent, Projection, Rows, Table
from tests.projections.helpers import assert_tables_match, workload

#: Append-only, keyed by account: a second entry for an account is refused by the database
#: (handlers cannot see append-only rows, so only the write finds out).
ENTRIES = Table("one_entry", (Column("account_id"), Column("amount", "bigint")), ("account_id",),
                append_only=True)  # fmt: skip


def _entry(event: LogEvent, rows: Rows) -> None:
    rows.put(ENTRIES.name, {"account_id": event.originator_id, "amount": 1})


BROKEN = Projection("one_entry", 1, (ENTRIES,), {"Account.Deposited": _entry})


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/daybook.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    ledger = open_ledger(url)
    yield ledger
    ledger.close()


def test_rows_the_database_refuses_stop_that_projection_only(ledger: Ledger, url: str) -> None:
    ids = workload(ledger, 40)
    for _ in range(2):
        ledger.deposit(ids[0], 5)  # two deposits to one account: two entries, one key
    runner = ProjectionRunner(
        event_log_of(ledger), url, [projections.ACCOUNT_BALANCES, BROKEN], batch_size=1000
    )
    runner.run_until_caught_up()
    assert runner.health().state is not ServiceState.FAILED
    runner.stop()
    store = open_store(url)
    try:
        catalog = VersionCatalog(store)
        broken = catalog.version("one_entry", 1)
        assert broken is not None and broken.state is VersionState.STOPPED
        assert broken.error is not None and "writing its rows failed" in broken.error
        balances = catalog.version("account_balances", 1)
        assert balances is not None and balances.state is VersionState.LIVE
        assert balances.position == ledger.head()
    finally:
        store.close()
    assert_tables_match(ledger, url, projections.ACCOUNT_BALANCES)


def test_rows_refused_in_a_batch_of_live_versions_leave_the_others_applied_once(
    ledger: Ledger, url: str
) -> None:
    """As above, but the refused rows come in a batch after both versions were built and
    serve (the first build takes another path): the whole batch is rolled back, and the
    other projection's part, written again alone, is applied once, not on top of what the
    rolled-back batch had left in its row cache."""
    ids = [ledger.open_account(f"owner-{n}", "EUR").account_id for n in range(3)]
    for account in ids:
        ledger.deposit(account, 100)  # one entry each: the broken projection serves too
    runner = ProjectionRunner(
        event_log_of(ledger), url, [projections.ACCOUNT_BALANCES, BROKEN], batch_size=1000
    )
    runner.run_until_caught_up()
    assert runner.step() == 0
    ledger.deposit(ids[1], 7)
    ledger.deposit(ids[0], 5)  # a second entry for ids[0]: its rows are refused
    runner.run_until_caught_up()
    assert runner.health().state is not ServiceState.FAILED
    runner.stop()
    _stopped_for_its_rows(url, "one_entry")
    assert_tables_match(ledger, url, projections.ACCOUNT_BALANCES)


#: A value no 64-bit column holds (a day's total that passed 2**63-1, say).
HUGE = Table("huge", (Column("account_id"), Column("amount", "bigint")), ("account_id",))


def _huge(event: LogEvent, rows: Rows) -> None:
    rows.put(HUGE.name, {"account_id": event.originator_id, "amount": 2**63})


TOO_BIG = Projection("huge", 1, (HUGE,), {"Account.Deposited": _huge})


def test_a_value_out_of_the_columns_range_stops_that_projection_only(
    ledger: Ledger, url: str
) -> None:
    """PostgreSQL refuses it (bigint out of range); SQLite's driver refuses to pass it at all
    (``OverflowError``, not a database error): either way it is the rows' fault, and the
    runner goes on with every other projection."""
    workload(ledger, 20)
    runner = ProjectionRunner(
        event_log_of(ledger), url, [projections.ACCOUNT_BALANCES, TOO_BIG], batch_size=1000
    )
    runner.run_until_caught_up()
    assert runner.health().state is not ServiceState.FAILED, runner.health()
    runner.stop()
    store = open_store(url)
    try:
        catalog = VersionCatalog(store)
        huge = catalog.version("huge", 1)
        assert huge is not None and huge.state is VersionState.STOPPED
        assert huge.error is not None and "writing its rows failed" in huge.error, huge.error
        balances = catalog.version("account_balances", 1)
        assert balances is not None and balances.state is VersionState.LIVE
        assert balances.position == ledger.head()
    finally:
        store.close()


def _stopped_for_its_rows(url: str, name: str) -> None:
    """``name`` v1 is stopped, its rows' error the reason."""
    store = open_store(url)
    try:
        record = VersionCatalog(store).version(name, 1)
    finally:
        store.close()
    assert record is not None and record.state is VersionState.STOPPED, record
    assert record.error is not None and "writing its rows failed" in record.error, record.error


@pytest.mark.parametrize("kind", [ProjectionRunner, BulkRunner])
def test_rows_refused_stop_their_projection_when_the_runner_writes_it_alone(
    ledger: Ledger, url: str, kind: type[ProjectionRunner]
) -> None:
    """A runner that writes one version (``run_projections(projections=[...])``, or a standby
    whose other versions another runner holds): there is no other projection to blame, and
    the rows' fault still stops only that version, never the runner, which failed (and
    failed again at every restart) with the version never marked stopped."""
    workload(ledger, 20)
    runner = kind(event_log_of(ledger), url, [TOO_BIG], batch_size=1000)
    try:
        runner.run_until_caught_up()
        assert runner.health().state is not ServiceState.FAILED, runner.health()
        assert ("huge", 1) in runner.halted and not runner.slots
    finally:
        runner.stop()
    _stopped_for_its_rows(url, "huge")


def test_rows_refused_in_a_bulk_batch_stop_only_their_projection(ledger: Ledger, url: str) -> None:
    """The bulk runner (rebuilds, long catch-ups) writes its batches in one go: a value out
    of range there failed the whole runner, every projection with it."""
    workload(ledger, 20)
    runner = BulkRunner(
        event_log_of(ledger), url, [projections.ACCOUNT_BALANCES, TOO_BIG], batch_size=1000
    )
    try:
        runner.run_until_caught_up()
        assert runner.health().state is not ServiceState.FAILED, runner.health()
    finally:
        runner.stop()
    _stopped_for_its_rows(url, "huge")
    assert_tables_match(ledger, url, projections.ACCOUNT_BALANCES)


def test_a_refused_last_batch_that_was_full_stops_the_version(ledger: Ledger, url: str) -> None:
    """The refused batch is a full one, so still in flight when the next step finds the log
    read to its end: that step let go of everything, said it had caught up, and the rebuild
    failed an assertion with the version left ``rebuilding`` (at every try)."""
    workload(ledger, 20)
    with pytest.raises(RebuildError, match="writing its rows failed"):
        rebuild(event_log_of(ledger), url, TOO_BIG, batch_size=ledger.head(), progress=False)
    _stopped_for_its_rows(url, "huge")


def test_a_rebuild_whose_rows_are_refused_stops_the_version_and_says_why(
    ledger: Ledger, url: str
) -> None:
    """``daybook projections rebuild``: the version stops with its rows' error as the reason
    (a ``rebuild_refused`` naming it), rather than the database's error escaping with the
    version left to fail the same way at every try."""
    workload(ledger, 20)
    with pytest.raises(RebuildError, match="writing its rows failed"):
        rebuild(event_log_of(ledger), url, TOO_BIG, progress=False)
    _stopped_for_its_rows(url, "huge")


def test_the_pure_python_drivers_refusal_of_a_value_is_the_rows_fault_too(pg_url: str) -> None:
    """A value past 64 bits in a binary COPY: psycopg's C implementation refuses it with
    OverflowError, its pure-Python one with struct.error, which failed the whole runner."""
    store = open_store(pg_url)
    try:
        with pytest.raises(struct.error) as refused:
            struct.pack("!q", 2**63)  # what the pure-Python int8 dumper does
        assert store.refused_rows(refused.value)
    finally:
        store.close()
