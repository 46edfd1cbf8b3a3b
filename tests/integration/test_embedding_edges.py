"""daybook embedded in a program on its embedded backends: where its read models go, files an
older daybook wrote opened by several processes at once, a closed ledger, odd paths, and the
settings it reads from the environment."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

import psycopg
import psycopg_pool
import pytest

from daybook import open_event_log, open_ledger, open_read_models, run_projections
from daybook.domain.accounts import Deposit
from daybook.infrastructure.bootstrap import (
    continuous_reconciler,
    projection_runner,
    settings_for,
)
from daybook.infrastructure.ledger.application import StorageFull, Unavailable, unavailable
from daybook.infrastructure.ledger.conflicts import PositionsBehind
from daybook.infrastructure.readmodels import StaleRead
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionState
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.urls import BadURL
from tests.pg_locks import events_table
from tests.together import failures_together


def test_a_ledger_opened_on_a_url_keeps_its_read_models_out_of_readmodels_url_of_the_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README: "Read models live in the event store's database by default; for
    memory://, in a temporary SQLite file". An operator's $DAYBOOK_READMODELS_URL (set for
    their `daybook serve`) must not receive a scratch ledger's read models."""
    monkeypatch.delenv("DAYBOOK_READMODELS_URL", raising=False)
    production = f"sqlite:///{tmp_path}/production-readmodels.db"
    with (
        open_ledger(f"sqlite:///{tmp_path}/production.db") as prod,
        run_projections(prod, production, poll_interval=0.01) as runner,
    ):
        ann = prod.open_account("ann", "EUR").account_id
        for _ in range(5):
            receipt = prod.deposit(ann, 100)
        runner.views.balance(ann, min_position=receipt.position, timeout=30)

    monkeypatch.setenv("DAYBOOK_READMODELS_URL", production)
    with (
        open_ledger("memory://") as scratch,
        run_projections(scratch, poll_interval=0.01) as runner,
    ):
        bob = scratch.open_account("bob", "EUR").account_id
        for _ in range(8):
            receipt = scratch.deposit(bob, 7)
        try:
            row = runner.views.balance(bob, min_position=receipt.position, timeout=5)
        except StaleRead:
            row = None

    store = open_store(production)
    try:
        stopped = [
            (v.name, v.error)
            for v in VersionCatalog(store).versions()
            if v.state is VersionState.STOPPED
        ]
    finally:
        store.close()
    assert not stopped, f"a scratch ledger stopped the production read models: {stopped}"
    assert row is not None and row.balance == 56


FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ledger-v0.1.db"


def test_processes_opening_a_file_written_before_0_2_together_all_open(tmp_path: Path) -> None:
    """After an upgrade, the processes on one SQLite file (a server, its projection runner)
    start together and each migrates the request table as it opens the file: every one of
    them must open, as they do on a new file
    (test_ledgers_opening_a_new_sqlite_file_together_all_open)."""
    for attempt in range(20):
        shutil.copy(FIXTURE, tmp_path / f"old-{attempt}.db")

    def open_one(attempt: int) -> None:
        with open_ledger(f"sqlite:///{tmp_path}/old-{attempt}.db") as ledger:
            assert ledger.head() == 15

    failures = failures_together(open_one, rounds=20, threads=3)
    assert failures == [], f"{len(failures)} of 60 opens failed: {failures[0]!r}"


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_closed_ledger_without_group_commit_refuses_new_commands(
    kind: str, tmp_path: Path
) -> None:
    """As test_a_closed_ledger_refuses_new_commands (group commit) does: a closed ledger
    writes nothing more, and says it is closed."""
    from daybook.infrastructure.ledger.group_commit import LedgerClosed

    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/solo.db"
    ledger = open_ledger(url, group_commit=False)
    account = ledger.open_account("a", "EUR").account_id
    head = ledger.head()
    ledger.close()
    ledger.close()  # twice: nothing more happens
    with pytest.raises(LedgerClosed):
        ledger.deposit(account, 1)
    with pytest.raises(LedgerClosed):
        ledger.submit([Deposit(account, 1)])
    if kind == "sqlite":
        with open_ledger(url) as reopened:
            assert reopened.head() == head


@pytest.mark.parametrize("group_commit", [True, False])
def test_an_empty_submission_to_a_closed_ledger_is_refused_as_any_other(
    group_commit: bool,
) -> None:
    """An empty settlement file submitted to a closed ledger learns it is closed then, not
    at its next call, with or without group commit."""
    from daybook import LedgerClosed

    ledger = open_ledger("memory://", group_commit=group_commit)
    ledger.close()
    with pytest.raises(LedgerClosed):
        ledger.submit([])


def test_an_empty_submission_to_a_closed_asyncio_ledger_is_refused_as_any_other() -> None:
    from daybook import LedgerClosed, open_async_ledger

    async def submit() -> None:
        ledger = open_async_ledger("memory://")
        await ledger.close()
        await ledger.submit([])

    with pytest.raises(LedgerClosed):
        asyncio.run(submit())


def test_a_sqlite_url_naming_a_folder_or_another_kind_of_file_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    """As a missing folder is (BadURL, the path named): not sqlite3's "unable to open
    database file" or "file is not a database", which name neither the URL nor the path."""
    folder = tmp_path / "ledgers"
    folder.mkdir()
    with pytest.raises(BadURL, match="ledgers"):
        open_ledger(f"sqlite:///{folder}")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n" * 100)
    with pytest.raises(BadURL, match=r"notes\.txt"):
        open_ledger(f"sqlite:///{notes}")
    assert notes.read_text() == "not a database\n" * 100


def test_readers_on_a_mistyped_sqlite_path_are_refused_and_create_nothing(
    tmp_path: Path,
) -> None:
    """A reader (the event log, the read-model queries) opened on a SQLite file that is not
    there names the path and leaves nothing behind: creating an empty database there would
    answer, for ever, that nothing has been written or built yet."""
    with open_ledger(f"sqlite:///{tmp_path}/ledger.db") as ledger:
        ledger.open_account("alice", "EUR")
    typo = tmp_path / "ledgr.db"
    with pytest.raises(BadURL, match=r"ledgr\.db"):
        open_event_log(f"sqlite:///{typo}")
    with pytest.raises(BadURL, match=r"ledgr\.db"):
        open_read_models(f"sqlite:///{typo}")
    assert not typo.exists()
    log = open_event_log(f"sqlite:///{tmp_path}/ledger.db")  # the right path still opens
    try:
        assert log.head() == 1
    finally:
        log.close()


def test_the_services_that_may_start_first_make_the_sqlite_file_a_reader_may_not(
    tmp_path: Path,
) -> None:
    """``daybook project`` (and the continuous reconciler) started before any ledger wrote:
    they make the file, as a ledger would, where a reader is refused."""
    url = f"sqlite:///{tmp_path}/fresh.db"
    runner = projection_runner(settings_for(url))
    try:
        runner.step()
    finally:
        runner.stop()
    reconciler = continuous_reconciler(settings_for(f"sqlite:///{tmp_path}/other.db"))
    reconciler.close()
    assert (tmp_path / "fresh.db").exists() and (tmp_path / "other.db").exists()


def test_every_variable_the_settings_read_is_in_the_readme() -> None:
    """`open_ledger(url)` reads these whatever URL it is given (group commit, cache size...):
    an embedding program's behaviour changes with a variable the README should name."""
    from daybook.infrastructure.settings import ENVIRONMENT

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [
        name
        for name in [*ENVIRONMENT, "DAYBOOK_FAULTS"]
        if f"${name}" not in readme and f"`{name}" not in readme
    ]
    assert missing == []


def test_a_ledger_on_any_other_url_takes_readmodels_url_from_the_env_as_the_cli_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a memory ledger leaves the variable out: a service that passes its own URL to
    ``open_ledger`` and keeps its read models where ``$DAYBOOK_READMODELS_URL`` says finds
    them there, as ``daybook serve --url`` and ``open_read_models()`` do."""
    from daybook.infrastructure.bootstrap import settings_for

    views = f"sqlite:///{tmp_path}/views.db"
    monkeypatch.setenv("DAYBOOK_READMODELS_URL", views)
    monkeypatch.delenv("DAYBOOK_URL", raising=False)
    assert settings_for(f"sqlite:///{tmp_path}/ledger.db").readmodels_url == views
    assert settings_for("memory://").readmodels_url is None


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "direct"])
def test_an_event_store_whose_position_sequence_restarted_says_so_and_writes_nothing(
    pg_url: str, group_commit: bool
) -> None:
    """The events table restored without its sequence's state (rows loaded into a fresh
    table, or the sequence reset): every write draws a position the log has. It was taken
    for a version conflict, retried 40 times and answered ``concurrency_conflict`` ("other
    writers kept changing the same accounts; retry") with no other writer anywhere. It
    says what happened and what to run; once the operator has, writes go on."""
    with open_ledger(pg_url) as ledger:
        account = ledger.open_account("ann", "EUR").account_id
        for _ in range(5):
            ledger.deposit(account, 1)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        table = events_table(conn)
        conn.execute(
            "SELECT setval(pg_get_serial_sequence(%s, 'notification_id'), 1, false)", (table,)
        )  # the restore: the next position drawn is 1
    with open_ledger(pg_url, group_commit=group_commit) as ledger:
        with pytest.raises(PositionsBehind) as raised:
            ledger.deposit(account, 5, request_id="after-restore")
        assert raised.value.code == "position_sequence_behind"
        assert "setval(" in str(raised.value) and "notification_id" in str(raised.value)
        assert ledger.account(account).balance == 5  # nothing was written
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "SELECT setval(pg_get_serial_sequence(%s, 'notification_id'),"
                f" (SELECT max(notification_id) FROM {table}))",
                (table,),
            )
        assert not ledger.deposit(account, 5, request_id="after-restore").replayed
        assert ledger.account(account).balance == 10


def test_asyncio_reads_waiting_on_the_database_leave_the_loops_default_executor_free(
    tmp_path: Path,
) -> None:
    """An asyncio service's own ``asyncio.to_thread`` work (and ``loop.getaddrinfo``, which
    aiohttp and httpx resolve host names with) runs in the loop's default executor: a few
    workers (``min(32, cpus + 4)``). ``AsyncLedger``'s reads ran there too, so while the
    database did not answer (an outage: each read waits its ``connect_timeout``, 10 s),
    that many reads held every worker and the service's own work waited for the outage."""
    import os
    import threading
    from typing import Any

    from daybook import open_async_ledger

    workers = min(32, (os.cpu_count() or 1) + 4)
    answer = threading.Event()  # the database answers again

    async def scenario() -> str:
        ledger = open_async_ledger(f"sqlite:///{tmp_path}/ledger.db")
        account = (await ledger.open_account("ann", "EUR")).account_id
        recorder: Any = ledger.service.recorder
        select = recorder.max_notification_id

        def silent(*args: Any, **kwargs: Any) -> Any:
            answer.wait(60)  # the database does not answer
            return select(*args, **kwargs)

        recorder.max_notification_id = silent
        reads = [asyncio.ensure_future(ledger.head()) for _ in range(workers)]
        await asyncio.sleep(0.2)
        try:
            # The service's own work, while the ledger's reads wait for the database.
            return await asyncio.wait_for(asyncio.to_thread(lambda: "ran"), timeout=10)
        except TimeoutError:
            return "waited for the database"
        finally:
            answer.set()
            await asyncio.gather(*reads)
            assert (await ledger.account(account)).balance == 0
            await ledger.close()

    assert asyncio.run(scenario()) == "ran"


def test_an_asyncio_read_the_database_does_not_answer_is_answered_with_a_code(
    tmp_path: Path,
) -> None:
    """A read through the ledger (``account``, ``head``...) that meets an outage raised
    eventsourcing's bare ``OperationalError``: no ``code``, not ``daybook.Unavailable``,
    which a service catches for the same outage met by a command."""
    from typing import Any

    from eventsourcing.persistence import OperationalError

    from daybook import open_async_ledger

    async def scenario() -> BaseException:
        ledger = open_async_ledger(f"sqlite:///{tmp_path}/ledger.db")
        recorder: Any = ledger.service.recorder

        def refused(*args: Any, **kwargs: Any) -> Any:
            # As eventsourcing wraps the pool's wait for a connection that never came.
            timeout = psycopg_pool.PoolTimeout("couldn't get a connection after 10.00 sec")
            raise OperationalError(str(timeout)) from timeout

        recorder.max_notification_id = refused
        try:
            await ledger.head()
        except OperationalError as error:
            return error
        finally:
            await ledger.close()
        raise AssertionError("the read answered")

    error = asyncio.run(scenario())
    assert getattr(error, "code", None) == "unavailable", repr(error)


# -- reads that meet the store's errors --------------------------------------------------


@pytest.mark.parametrize("failure", ["table gone", "pool closed"])
def test_a_read_meeting_no_outage_is_not_called_one(
    failure: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A store error that is no outage: a SQLite events table gone (a bug, a wrong file:
    sqlite3's "no such table", an OperationalError to eventsourcing), or the PostgreSQL pool
    closed under an open ledger (psycopg_pool's PoolClosed). "Read again once it answers"
    would never help: not ``Unavailable``, which a caller may retry for ever."""
    url = (
        f"sqlite:///{tmp_path}/l.db"
        if failure == "table gone"
        else str(request.getfixturevalue("pg_url"))
    )
    ledger = open_ledger(url)
    ann = ledger.open_account("ann", "EUR").account_id
    if failure == "table gone":
        with sqlite3.connect(tmp_path / "l.db") as conn:
            conn.execute("ALTER TABLE stored_events RENAME TO gone")
    else:
        ledger.service.recorder.datastore.pool.close()
    try:
        with pytest.raises(Exception) as raised:
            ledger.account(ann)
        assert not isinstance(raised.value, Unavailable), repr(raised.value)
    finally:
        ledger.close()


def test_a_read_out_of_disk_space_is_not_answered_as_a_command() -> None:
    """A read (a PostgreSQL sort spilling to disk can meet disk_full) answered
    reading=True: the message must not tell the caller to send a command again."""
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    answer = unavailable(error, reading=True)
    assert isinstance(answer, StorageFull)
    assert "command" not in str(answer), str(answer)
