"""daybook on a PostgreSQL that ends its sessions: a restart, or its idle_session_timeout."""

from __future__ import annotations

import time

import psycopg
import pytest

from daybook import open_ledger

pytestmark = [pytest.mark.postgres]


def _database(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?")[0]


def _end_every_session(admin_url: str, database_url: str) -> None:
    """What a restart (fast shutdown, then start) does to a client's open connections."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (_database(database_url),),
        )


@pytest.mark.parametrize("how", ["restart", "idle_session_timeout"])
@pytest.mark.parametrize("group_commit", [True, False], ids=["group", "direct"])
def test_a_pool_of_connections_the_server_ended_does_not_fail_the_next_command(
    pg_url: str, pg_admin_url: str, how: str, group_commit: bool
) -> None:
    """After a busy spell the event store's pool holds more than four connections (up to
    twenty). A server restart, or an idle spell longer than the server's
    ``idle_session_timeout``, ends them all while they sit in the pool; the server is up
    and a fresh connection works. The next command, and the next read, must go through:
    each dead connection fails at once, and the README promises that such a failure is
    tried again on a fresh connection."""
    if how == "idle_session_timeout":
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{_database(pg_url)}" SET idle_session_timeout = 2000')
    with open_ledger(pg_url, group_commit=group_commit) as ledger:
        account = ledger.open_account("ann", "EUR").account_id
        ledger.deposit(account, 100)
        pool = ledger.service.recorder.datastore.pool
        busy = [pool.getconn() for _ in range(12)]  # a busy spell: twelve at once
        for conn in busy:
            pool.putconn(conn)
        if how == "restart":
            _end_every_session(pg_admin_url, pg_url)
        else:
            time.sleep(3)  # idle past the server's idle_session_timeout
        receipt = ledger.deposit(account, 5, request_id="after-1")
        assert receipt.replayed is False
        assert ledger.account(account).balance == 105


def test_connections_are_replaced_after_an_ended_session_without_testing_each(
    pg_url: str,
) -> None:
    """One session the server ended says nothing of the others: a partition may follow, and
    testing each idle connection (psycopg_pool's ``check``) held the writer a TCP timeout per
    connection, past the ledger's outage budget (38 s for 10 connections at a 4 s timeout,
    behind a cut link). The idle ones are replaced without a test, by new ones the
    pool's workers open."""
    from daybook.infrastructure.transient import discard_ended_connections

    with open_ledger(pg_url) as ledger:
        recorder = ledger.service.recorder
        pool = recorder.datastore.pool
        busy = [pool.getconn() for _ in range(6)]
        before = {conn.info.backend_pid for conn in busy}
        for conn in busy:
            pool.putconn(conn)
        tested: list[object] = []
        pool.check_connection = tested.append  # each test: a round trip, or a TCP timeout
        discard_ended_connections(recorder, psycopg.errors.AdminShutdown("terminating"))
        assert tested == []
        with pool.connection() as conn:  # a new one, opened by the pool's workers
            assert conn.info.backend_pid not in before
