"""A rebuild's switch reaches every follower; an interrupted first build is never served."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from daybook import Ledger, open_ledger, run_projections
from daybook.domain.orders import PlaceOrder
from daybook.domain.sagas import SagaState
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.cli import main
from daybook.infrastructure.readmodels import ReadModelChanged, StaleRead, engine
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionState
from daybook.infrastructure.readmodels.handover import handover
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.queries import ReadModels
from daybook.infrastructure.readmodels.rebuild import rebuild
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.infrastructure.readmodels.store import ReadStore
from daybook.infrastructure.sagas.processor import saga_counts
from daybook.projections.accounts import ACCOUNT_BALANCES, BALANCES
from daybook.projections.model import Column, Handler, Key, Projection, Row, Rows, Table
from daybook.projections.sagas import SAGA_LIST, SAGA_STATES, SAGAS
from tests.projections.helpers import (
    assert_tables_match,
    switch_to_v2_without_a_column,
    workload,
)
from tests.projections.test_rebuild_reconcile import ACCOUNT_BALANCES_V2


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


def test_a_runner_whose_code_is_older_than_the_serving_version_says_so(
    ledger: Ledger,
    db_url: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = workload(ledger, 80)
    caplog.set_level(logging.INFO)
    old = run_projections(ledger, db_url, start=False)
    try:
        old.run_until_caught_up()
        rebuild(event_log_of(ledger), db_url, ACCOUNT_BALANCES_V2, progress=False)
        workload(ledger, 20, seed=3, accounts=ids)
        old.run_until_caught_up()  # it lets go of version 1, and cannot follow version 2
        capsys.readouterr()
        assert main(["projections", "status", "--url", db_url]) == 1
        # A rolling deploy under way looks like this: status and the log say so, but the
        # old code's servers stay healthy (all failing at once would take them all out).
        assert old.health().ok and old.versions_health().ok
    finally:
        old.stop()
    out = capsys.readouterr().out
    assert "cannot follow account_balances version 2" in out
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("cannot follow account_balances version 2" in line for line in logged), logged
    # The new code deployed: its runner follows version 2, and status is content again.
    new = run_projections(ledger, db_url, projections=[ACCOUNT_BALANCES_V2], start=False)
    try:
        new.run_until_caught_up()
        assert new.versions_health().ok
    finally:
        new.stop()
    assert main(["projections", "status", "--url", db_url]) == 0
    assert_tables_match(ledger, db_url, ACCOUNT_BALANCES_V2)


def test_a_note_from_an_old_runner_goes_once_a_runner_follows_the_version(
    ledger: Ledger, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rolling deployment: the runner with the new code builds version 2 and switches
    reads while the old one runs; the old one then notes that it cannot follow. Once the
    old one is gone and the new one goes on following version 2, status is content again:
    the note does not outlive what it said."""
    ids = workload(ledger, 60)
    old = run_projections(ledger, db_url, start=False)
    new = run_projections(ledger, db_url, projections=[ACCOUNT_BALANCES_V2], start=False)
    try:
        old.run_until_caught_up()
        new.run_until_caught_up()  # builds version 2 and switches reads to it
        workload(ledger, 10, seed=3, accounts=ids)
        old.run_until_caught_up()  # lets go of version 1, and cannot follow version 2
        old.stop()
        capsys.readouterr()
        assert main(["projections", "status", "--url", db_url]) == 1
        assert "cannot follow account_balances version 2" in capsys.readouterr().out
        workload(ledger, 10, seed=4, accounts=ids)
        new.run_until_caught_up()
        assert main(["projections", "status", "--url", db_url]) == 0
    finally:
        old.stop()
        new.stop()
    assert_tables_match(ledger, db_url, ACCOUNT_BALANCES_V2)


def test_an_old_runner_claiming_a_version_as_reads_switch_away_from_it_goes_on(
    ledger: Ledger, db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A runner with the old code (a server restarting, or reconnecting after a blip, in a
    rolling deploy) reads version 1's catalog row (live), then loads its cache from version
    1's tables; a rebuild with the new code switches reads to version 2 in between, and
    drops version 1's tables. The missing table failed the whole runner (every projection
    with it): the version moved, and the runner lets go of it and says it cannot follow."""
    ids = workload(ledger, 40)
    log = event_log_of(ledger)
    first = ProjectionRunner(log, db_url, [ACCOUNT_BALANCES])
    first.run_until_caught_up()
    first.stop()  # the old server restarts...
    warm = engine.RowCache.warm
    switched: list[bool] = []

    def switch_then_warm(cache: engine.RowCache, store: ReadStore, empty: bool) -> None:
        if cache.projection.version == 1 and not switched:
            switched.append(True)
            # ...while `daybook projections rebuild` with the new code switches reads.
            rebuild(event_log_of(ledger), db_url, ACCOUNT_BALANCES_V2, progress=False)
        warm(cache, store, empty)

    monkeypatch.setattr(engine.RowCache, "warm", switch_then_warm)
    restarted = ProjectionRunner(event_log_of(ledger), db_url, [ACCOUNT_BALANCES])
    try:
        restarted.run_until_caught_up()
        workload(ledger, 10, seed=3, accounts=ids)
        restarted.run_until_caught_up()
        assert switched
        assert restarted.health().ok and restarted.versions_health().ok
        assert not restarted.slots
    finally:
        restarted.stop()
    capsys.readouterr()
    assert main(["projections", "status", "--url", db_url]) == 1
    assert "cannot follow account_balances version 2" in capsys.readouterr().out


def test_a_runner_says_it_cannot_follow_a_rebuild_of_a_version_a_group_owned(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Version 1 is handed to a stream group; a rebuild with newer code builds version 2
    (the runner's) and switches reads to it, retiring the group's version 1. A runner with
    the old code is running: it cannot follow version 2, and says so, as it does when it
    owned version 1 itself (it said only that the group owned version 1, and status was
    content while nobody followed version 2)."""
    ledger = open_ledger(pg_url)
    try:
        ids = workload(ledger, 40)
        log = event_log_of(ledger)
        old = run_projections(ledger, pg_url, start=False)
        try:
            old.run_until_caught_up()
            handover(log, pg_url, [ACCOUNT_BALANCES], "stream:g", topic="t", partitions=1)
            rebuild(log, pg_url, ACCOUNT_BALANCES_V2, progress=False)
            workload(ledger, 10, seed=3, accounts=ids)
            old.run_until_caught_up()
            capsys.readouterr()
            assert main(["projections", "status", "--url", pg_url]) == 1
        finally:
            old.stop()
        assert "cannot follow account_balances version 2" in capsys.readouterr().out
    finally:
        ledger.close()


def test_an_interrupted_first_build_is_not_served_and_resumes(ledger: Ledger, db_url: str) -> None:
    ids = workload(ledger, 150)
    output = io.StringIO()
    writes = [0]

    class Interrupted(Exception):
        pass

    def stream_write(text: str) -> int:
        writes[0] += 1
        if writes[0] == 1:
            raise Interrupted
        return len(text)

    output.write = stream_write  # type: ignore[method-assign]
    with pytest.raises(Interrupted):
        rebuild(event_log_of(ledger), db_url, ACCOUNT_BALANCES, batch_size=20, stream=output)
    store = open_store(db_url)
    try:
        catalog = VersionCatalog(store)
        partial = catalog.version("account_balances", 1)
        assert partial is not None and 0 < partial.position < ledger.head()
        assert partial.state is VersionState.REBUILDING
        assert catalog.active_version("account_balances") is None
    finally:
        store.close()
    with ReadModels(db_url) as views, pytest.raises(StaleRead):
        views.balance(ids[0], timeout=0.05)  # nothing is served from a partial build
    result = rebuild(
        event_log_of(ledger), db_url, ACCOUNT_BALANCES, batch_size=20, stream=io.StringIO()
    )
    assert result.resumed_from == partial.position
    assert_tables_match(ledger, db_url, ACCOUNT_BALANCES)
    with ReadModels(db_url) as views:
        row = views.balance(ids[0])
        assert row is not None and row.as_of_position == ledger.head()


def _lag_series(version: int) -> list[float]:
    """This process's lag figures for account_balances ``version`` (events, seconds)."""
    from daybook.infrastructure.observability import metrics

    found = []
    for gauge in (metrics.PROJECTION_LAG_EVENTS, metrics.PROJECTION_LAG_SECONDS):
        for family in gauge.collect():
            found += [
                s.value
                for s in family.samples
                if s.labels == {"projection": "account_balances", "version": str(version)}
            ]
    return found


def test_a_runner_stops_reporting_the_lag_of_a_version_it_let_go_for_good(
    ledger: Ledger, db_url: str
) -> None:
    """A retired version's lag, frozen at its last figure, would keep an alert on it
    firing (or quiet) for as long as the process runs."""
    ids = workload(ledger, 40)
    old = run_projections(ledger, db_url, start=False, batch_size=10)
    try:
        old.run_until_caught_up()  # version 1 serves reads
        workload(ledger, 40, seed=2, accounts=ids)
        old.step()  # one batch of 10: version 1 lags behind, and says by how much
        assert len(_lag_series(1)) == 2 and _lag_series(1)[0] > 0
        rebuild(event_log_of(ledger), db_url, ACCOUNT_BALANCES_V2, progress=False)
        old.run_until_caught_up()  # it lets go of version 1, retired by the rebuild
        assert _lag_series(1) == []
    finally:
        old.stop()


def test_a_first_build_overtaken_by_a_newer_version_is_retired_and_its_tables_go(
    ledger: Ledger, db_url: str
) -> None:
    """Version 1's first build stopped half way; version 2 was built and serves. Version 1
    can never serve now: it goes, and a runner with the old code stops adding to it."""
    ids = workload(ledger, 60)
    old = run_projections(ledger, db_url, start=False, batch_size=10)
    try:
        old.step()  # version 1 is built in part, and serves nothing
        rebuild(event_log_of(ledger), db_url, ACCOUNT_BALANCES_V2, progress=False)
        workload(ledger, 10, seed=4, accounts=ids)
        old.run_until_caught_up()
        store = open_store(db_url)
        try:
            catalog = VersionCatalog(store)
            first = catalog.version("account_balances", 1)
            assert first is not None and first.state is VersionState.RETIRED
            assert first.position < ledger.head()  # let go of, not built on
            assert catalog.active_version("account_balances") == 2
            assert catalog.drop_retired("account_balances")
            with store.transaction(write=False):
                assert not store.has_column(BALANCES.physical_name(1), "account_id")
        finally:
            store.close()
    finally:
        old.stop()


def test_reads_of_a_version_whose_tables_this_code_cannot_read_say_so(
    ledger: Ledger, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """During a deploy, a process may run the code of another version than the one serving
    reads. Reading through table definitions the serving version's tables do not match is
    refused as that (``read_model_changed``), not as a bug or an outage."""
    ids = workload(ledger, 20)
    runner = run_projections(ledger, db_url, start=False)
    try:
        runner.run_until_caught_up()
    finally:
        runner.stop()
    account = (str(ids[0]),)
    with ReadModels(db_url) as views:
        # New code deployed before its rebuild: version 1 serves, which has no `deposits`.
        with pytest.raises(ReadModelChanged) as early:
            views.row(ACCOUNT_BALANCES_V2, "account_balances", account)
        assert early.value.code == "read_model_changed"
        assert "account_balances is served by its version 1" in str(early.value)
        assert "deposits" in str(early.value)  # the server's words name the column
        # A mistake in a query of the serving version's own code is no deploy: as it was.
        with pytest.raises(Exception) as typo:
            views.rows(ACCOUNT_BALANCES, "account_balances", where="balanse > %s", params=(0,))
        assert not isinstance(typo.value, ReadModelChanged)
        # The rebuild switches reads to version 2; say that version dropped a column that
        # version 1 reads: the old code's queries are refused, naming version 2.
        switch_to_v2_without_a_column(event_log_of(ledger), db_url)
        with pytest.raises(ReadModelChanged) as late:
            views.balance(ids[0])
        assert "account_balances is served by its version 2" in str(late.value)
    capsys.readouterr()
    assert main(["balance", str(ids[0]), "--url", db_url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is served by its version 2" in err[0], err


def test_reads_of_a_table_the_serving_version_does_not_have_yet_say_so(
    ledger: Ledger, db_url: str
) -> None:
    """New code whose version of a read model adds a table, deployed while the old version
    still serves: reading that table was taken for a version dropped under the read, tried
    again twenty times and raised as the database's own error (which stopped the saga
    processor, counting sagas from the table version 2 of ``sagas`` adds). It is a deploy
    under way (``read_model_changed``); the saga counts fall back to version 1's rows."""
    account = ledger.open_account("ann", "EUR").account_id
    ledger.deposit(account, 5)
    extra = Table("balance_notes", (Column("account_id"),), key=("account_id",))
    with_notes = Projection(
        ACCOUNT_BALANCES.name,
        ACCOUNT_BALANCES.version + 1,
        (*ACCOUNT_BALANCES.tables, extra),
        ACCOUNT_BALANCES.handlers,
    )
    # Version 1 of sagas: the same rows, no counts table.
    sagas_v1 = Projection(
        SAGA_LIST.name,
        1,
        (SAGAS,),
        {name: _without_counts(handler) for name, handler in SAGA_LIST.handlers.items()},
    )
    customer = ledger.open_account("cus", "EUR").account_id
    merchant = ledger.open_account("shop", "EUR").account_id
    ledger.deposit(customer, 100)
    ledger.receive_stock("MUG", 2)
    ledger.execute(PlaceOrder("o-1", customer, merchant, [("MUG", 1, 10)]))
    runner = run_projections(ledger, db_url, projections=[ACCOUNT_BALANCES, sagas_v1], start=False)
    try:
        runner.run_until_caught_up()
    finally:
        runner.stop()
    with ReadModels(db_url) as views:
        with pytest.raises(ReadModelChanged) as changed:
            views.rows(with_notes, "balance_notes")
        assert "account_balances is served by its version 1" in str(changed.value)
        counts = saga_counts(views)
    assert counts == {**{state.value: 0 for state in SagaState}, "running": 1}


class _RowsWithoutCounts:
    def __init__(self, rows: Rows) -> None:
        self.rows = rows

    def get(self, table: str, key: Key) -> Row | None:
        return None if table == SAGA_STATES.name else self.rows.get(table, key)

    def put(self, table: str, row: Row) -> None:
        if table != SAGA_STATES.name:
            self.rows.put(table, row)

    def delete(self, table: str, key: Key) -> None:
        self.rows.delete(table, key)


def _without_counts(handler: Handler) -> Handler:
    return lambda event, rows: handler(event, _RowsWithoutCounts(rows))
