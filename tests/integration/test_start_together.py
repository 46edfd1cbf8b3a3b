"""Services starting on a fresh PostgreSQL database: together, and stopped while they
start."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from daybook import open_ledger
from daybook.infrastructure.bootstrap import http_parts
from daybook.infrastructure.eventstore.identity import CREATE_TABLES_LOCK
from daybook.infrastructure.http.tokens import open_tokens
from daybook.infrastructure.settings import Settings
from scripts import services
from scripts.streams import wait_until
from tests.together import failures_together


@pytest.mark.postgres
def test_token_stores_opened_together_on_a_fresh_database_all_open(pg_admin_url: str) -> None:
    """`daybook serve` processes, or `tokens create` beside them, started together on an
    empty database each make the tokens table: PostgreSQL does not serialise two CREATE
    TABLE IF NOT EXISTS of one table (a unique violation in its catalog), so every one must
    take its turn."""
    failures: list[Exception] = []
    for round_number in range(6):
        name = f"daybook_tokens_{os.getpid()}_{round_number}"
        url = services.create_database(pg_admin_url, name)
        try:
            opened = failures_together(
                lambda _, url=url: open_tokens(url).close(), rounds=1, threads=4
            )
            failures += opened
        finally:
            services.drop_database(pg_admin_url, name)
    assert failures == []


@pytest.mark.postgres
def test_project_stopped_while_another_process_creates_the_tables_exits_0(pg_url: str) -> None:
    """Between its startup wait and its own stop, `daybook project` opens the log, which waits
    its turn while another process creates the tables (a migration, say): a SIGTERM there
    ends it at once with status 0, as during the wait (it was killed by the signal)."""
    open_ledger(pg_url).close()
    root = Path(__file__).resolve().parents[2]
    with psycopg.connect(pg_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (CREATE_TABLES_LOCK,))
        process = subprocess.Popen(
            [sys.executable, "-m", "daybook.infrastructure.cli", "project", "--url", pg_url],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def waiting() -> bool:
            # This lock's waiters only (a bigint key: its high and low 32 bits).
            row = holder.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND classid::bigint = %s AND objid::bigint = %s",
                (CREATE_TABLES_LOCK >> 32, CREATE_TABLES_LOCK & 0xFFFFFFFF),
            ).fetchone()
            return row is not None and row[0] > 0

        status = stopped_once(process, waiting, "project to wait for the table lock")
    assert status[0] == 0, status


def test_a_server_told_to_commit_each_command_alone_says_it_batches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """$DAYBOOK_GROUP_COMMIT=0 is read "for open_ledger and every command alike"; the
    asyncio ledger `daybook serve` runs on always batches, and says so rather than ignore
    the setting in silence."""
    import asyncio

    url = f"sqlite:///{tmp_path}/ledger.db"
    settings = Settings.load({"DAYBOOK_GROUP_COMMIT": "0"}, url=url)
    with caplog.at_level(logging.WARNING, logger="daybook.ledger"):
        parts = http_parts(settings, projections=None, sweep=False, tokens=open_tokens(url))
    try:
        assert "DAYBOOK_GROUP_COMMIT" in caplog.text
    finally:
        asyncio.run(parts.close())


def test_the_continuous_reconciler_starts_on_a_fresh_sqlite_file_and_stops_with_0(
    tmp_path: Path,
) -> None:
    """`daybook reconcile --continuous` may start before any ledger, as `project` does: it
    makes the file and runs (its start check refused a path with no file)."""
    root = Path(__file__).resolve().parents[2]
    database = tmp_path / "fresh.db"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "daybook.infrastructure.cli", "reconcile", "--continuous",
            "--url", f"sqlite:///{database}", "--startup-wait", "0",
        ],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    made = lambda: database.exists() or process.poll() is not None  # noqa: E731
    status = stopped_once(process, made, "the file")
    assert status[0] == 0, status  # (2, ...) if it refused the path


def stopped_once(
    process: subprocess.Popen[str], ready: Callable[[], bool], what: str
) -> tuple[int, str]:
    """SIGTERM ``process`` once ``ready()``; its exit status and the end of its stderr."""
    try:
        wait_until(ready, what)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, err[-500:]


@pytest.mark.postgres
def test_an_older_process_starting_mid_deploy_leaves_the_newer_append_function_alone(
    pg_url: str,
) -> None:
    """Every process creates its append function at start with CREATE OR REPLACE, under one
    name: during a rolling deploy (or a rollback), an older process starting beside newer
    ones replaced the function with its older body, and every newer process's writes ran
    that body from then on (an older body lacking a check the newer code relies on), until
    each restarted. Each body has a name of its own now: an older process's start changes
    nothing for the newer code's writes."""
    from psycopg.sql import SQL, Identifier

    ledger = open_ledger(pg_url)
    try:
        account = ledger.open_account("ann", "EUR").account_id
        older = "RAISE EXCEPTION 'an older body, without a check the newer code relies on'"
        with psycopg.connect(pg_url, autocommit=True) as conn:
            # What the start of an older process does, under the one name it knows.
            conn.execute(
                SQL(
                    "CREATE OR REPLACE FUNCTION public.{}(events json, requests json, "
                    "reused json, now double precision, snapshots json, reads json) "
                    "RETURNS SETOF bigint LANGUAGE plpgsql AS $BODY$ BEGIN {} ; END $BODY$"
                ).format(Identifier("daybook_append_daybook_events"), SQL(older))
            )
        ledger.deposit(account, 5)  # the newer code's write, with the newer body
        assert ledger.account(account).balance == 5
    finally:
        ledger.close()
