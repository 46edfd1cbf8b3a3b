"""A real hot standby: a read replica streaming the primary's WAL, as reads scale out in
production. It refuses every write, DDL and LISTEN (``cannot execute LISTEN during
recovery``). A runner may read the log from one, writing its read models to the primary,
and dashboards may read those read models from one; neither may hammer it with connections.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest

from daybook import Ledger, open_ledger, open_read_models, projections
from daybook.infrastructure.bootstrap import projection_runner
from daybook.infrastructure.settings import Settings
from scripts import services
from scripts.streams import unique, wait_until
from tests.projections.helpers import assert_tables_match, workload
from tests.projections.test_runner_faults import positions

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="session")
def standby(pg_server: services.PostgresHandle) -> Iterator[services.PostgresHandle]:
    if pg_server.external:
        pytest.skip("a standby is made of the embedded server ($DAYBOOK_TEST_DATABASE_URL is set)")
    handle = services.start_standby(pg_server)
    yield handle
    handle.stop()


@pytest.fixture
def ledger(pg_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(pg_url)
    yield ledger
    ledger.close()


def on_standby(standby: services.PostgresHandle, url: str) -> str:
    """The standby's URL of ``url``'s database."""
    return standby.database_url(urlsplit(url).path.lstrip("/"))


def replayed(primary_url: str, standby: services.PostgresHandle) -> None:
    """Wait until the standby has replayed everything the primary has written so far."""
    with psycopg.connect(primary_url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    target = row[0]

    def caught_up() -> bool:
        with psycopg.connect(standby.url, autocommit=True) as conn:
            done = conn.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
            ).fetchone()
        return bool(done and done[0])

    wait_until(caught_up, "the standby to replay the primary's WAL")


def sessions(url: str) -> int:
    """Sessions established so far on ``url``'s database, as its server counts them."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_runner_reading_the_log_from_a_standby_follows_the_primary_politely(
    ledger: Ledger, pg_url: str, pg_admin_url: str, standby: services.PostgresHandle
) -> None:
    """The runner reads the log from the standby and writes read models to the primary. It
    learns of new events by polling there (LISTEN is refused), without opening a connection
    to be refused at every poll: twenty polls a second, for three seconds, made at most a
    handful of sessions on the standby (the old code made one per poll)."""
    workload(ledger, 60)
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    replayed(pg_url, standby)
    log_url = on_standby(standby, pg_url)
    runner = projection_runner(
        Settings(url=log_url, readmodels_url=readmodels), poll_interval=0.05, batch_size=50
    )
    runner.start()
    try:
        names = {projection.name for projection in projections.ALL}
        wait_until(lambda: positions(readmodels) == dict.fromkeys(names, ledger.head()), "a build")
        before = sessions(log_url)
        time.sleep(3.0)  # idle: sixty polls
        time.sleep(1.0)  # a session's count is reported as it ends
        assert sessions(log_url) - before <= 5
        workload(ledger, 40, seed=2)
        head = ledger.head()
        wait_until(lambda: positions(readmodels) == dict.fromkeys(names, head), "the new events")
    finally:
        runner.stop()
    for projection in projections.ALL:
        assert_tables_match(ledger, readmodels, projection)


def test_dashboards_on_a_standby_read_what_the_runner_built_on_the_primary(
    ledger: Ledger, pg_url: str, standby: services.PostgresHandle
) -> None:
    ids = workload(ledger, 60)
    runner = projection_runner(Settings(url=pg_url), poll_interval=0.05)
    runner.run_until_caught_up()
    runner.stop()
    head = ledger.head()
    replayed(pg_url, standby)
    primary = open_read_models(pg_url)
    replica = open_read_models(on_standby(standby, pg_url))
    try:
        for account in ids[:5]:
            on_primary = primary.balance(account, min_position=head)
            on_replica = replica.balance(account, min_position=head)
            assert on_primary is not None and on_replica is not None
            assert on_replica.balance == on_primary.balance
            assert on_replica.as_of_position == on_primary.as_of_position == head
    finally:
        primary.close()
        replica.close()
