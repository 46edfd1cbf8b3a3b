"""Queries through a connection that may only read: a read replica, or a role given SELECT.

Reads scale out by sending dashboards to replicas. ``ReadModels`` used to create or upgrade
the catalog tables on its first query, which such a connection refuses: every read failed
(``cannot execute CREATE TABLE in a read-only transaction``, ``permission denied for
schema public``). A writer of the read models (the runner, a worker) keeps the catalog; reads
need none of that. ``default_transaction_read_only`` makes PostgreSQL refuse writes as a hot
standby does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from itertools import count

import psycopg
import pytest

from daybook import StaleRead, open_event_log, open_ledger, open_read_models, run_projections
from daybook.infrastructure.cli import main

pytestmark = pytest.mark.postgres

_roles = count()

#: How each kind of reader is made: a replica-like role, and one with SELECT only (it may
#: not create tables in the schema, as PostgreSQL 15 and later give nobody by default).
KINDS = {
    "read-only transactions": "ALTER ROLE {role} SET default_transaction_read_only = on",
    "SELECT only": "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
}


@pytest.fixture(params=sorted(KINDS))
def reader(request: pytest.FixtureRequest, pg_url: str) -> Iterator[str]:
    """A role that may only read ``pg_url``'s tables; yields its URL. (Granted on the tables
    there when the test calls ``grant``: after a writer made them.)"""
    role = f"daybook_reader_{os.getpid()}_{next(_roles)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(KINDS[request.param].format(role=role))
    yield pg_url.replace("postgres@", f"{role}@", 1)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def grant(pg_url: str, reader_url: str) -> None:
    role = reader_url.split("://", 1)[1].split("@", 1)[0]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")


def tables(pg_url: str) -> set[str]:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return {row[0] for row in rows}


def test_a_reader_that_may_not_write_reads_what_the_runner_built(pg_url: str, reader: str) -> None:
    with open_ledger(pg_url) as ledger:
        account = ledger.open_account("ann", "EUR").account_id
        receipt = ledger.deposit(account, 700)
        with run_projections(ledger) as runner:
            runner.views.balance(account, min_position=receipt.position, timeout=30)
    grant(pg_url, reader)
    log = open_event_log(reader)
    views = open_read_models(reader, log=log)
    try:
        row = views.balance(account, min_position=receipt.position)
        assert row is not None and row.balance == 700 and row.lag_events == 0
    finally:
        views.close()
        log.close()


def test_before_anything_is_built_such_a_reader_is_told_so_and_creates_nothing(
    pg_url: str, reader: str
) -> None:
    open_ledger(pg_url).close()  # the event store only: no read model, no catalog
    grant(pg_url, reader)
    before = tables(pg_url)
    views = open_read_models(reader)
    try:
        with pytest.raises(StaleRead, match="has not been built"):
            views.balance("00000000-0000-4000-8000-000000000001", timeout=0.2)
    finally:
        views.close()
    assert tables(pg_url) == before


def test_a_reader_whose_database_lost_its_catalog_is_told_nothing_is_built(pg_url: str) -> None:
    """A read-model database replaced by an empty one (restored, failed over): the next read
    says no version has been built, as on a new database, not a missing table."""
    with open_ledger(pg_url) as ledger:
        account = ledger.open_account("ann", "EUR").account_id
        receipt = ledger.deposit(account, 700)
        with run_projections(ledger) as runner:
            runner.views.balance(account, min_position=receipt.position, timeout=30)
    views = open_read_models(pg_url)
    try:
        assert views.balance(account) is not None
        with psycopg.connect(pg_url, autocommit=True) as conn:
            for (table,) in conn.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public' AND table_name NOT LIKE 'daybook_events%'"
                " AND table_name NOT IN ('daybook_requests', 'daybook_store')"
            ).fetchall():
                conn.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')
        with pytest.raises(StaleRead, match="has not been built"):
            views.balance(account, timeout=0.2)
    finally:
        views.close()


def test_projections_status_answers_such_a_reader(
    pg_url: str, reader: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`daybook projections status` only reads, yet it created or upgraded the catalog
    first: on a replica or as a SELECT-only role it ended in a traceback."""
    open_ledger(pg_url).close()  # the event store only: no read model, no catalog
    grant(pg_url, reader)
    assert main(["projections", "status", "--url", reader]) == 0
    assert "account_balances" not in capsys.readouterr().out  # nothing built yet
    with open_ledger(pg_url) as ledger:
        account = ledger.open_account("ann", "EUR").account_id
        ledger.deposit(account, 700)
        with run_projections(ledger, start=False) as runner:
            runner.run_until_caught_up()
    grant(pg_url, reader)
    before = tables(pg_url)
    assert main(["projections", "status", "--url", reader]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^account_balances +1 +yes +live ", out, re.MULTILINE), out
    assert tables(pg_url) == before


def test_projections_status_as_a_reader_of_a_catalog_an_older_daybook_made(
    pg_url: str, reader: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Writers still run an older daybook, whose catalog lacks a column this one reads, and
    status, as a reader, cannot add it: one line saying so, not a traceback."""
    with open_ledger(pg_url) as ledger, run_projections(ledger, start=False) as runner:
        runner.run_until_caught_up()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE daybook_projection_versions DROP COLUMN note")
    grant(pg_url, reader)
    assert main(["projections", "status", "--url", reader]) == 2
    err = capsys.readouterr().err
    assert "made by an older daybook" in err and "Traceback" not in err, err
