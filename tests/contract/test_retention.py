"""Request records are kept for a retention window, then deleted: storage stays bounded.

A caller-chosen request id replays its original outcome within the window; after it, the id
is new. Generated ids get one record per batch (its token), which lives only as long as the
ledger's own retry may need it.
The purge service deletes expired records in bounded batches. Time is an injected clock.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from daybook import IdempotencyConflict, Ledger, Receipt, Settings, open_ledger
from daybook.domain.accounts import Deposit
from daybook.infrastructure.cli import main
from daybook.infrastructure.ledger.requests import GENERATED_RETENTION
from daybook.infrastructure.ledger.retention import ClockCheck
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.settings import BadSettings
from daybook.infrastructure.urls import postgres_params, sqlite_path

WINDOW = 72 * 3600.0
START = 1_000_000.0  # Unix seconds: 1970, so records written "now" expired long ago for real


class Clock:
    """Time that moves only when told to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(store_url: str, clock: Clock) -> Iterator[Ledger]:
    settings = Settings.load(url=store_url, request_purge_interval=timedelta(0))
    ledger = open_ledger(settings=settings, clock=clock)
    yield ledger
    ledger.close()


def test_a_request_id_replays_within_its_window_and_is_new_after_it(
    ledger: Ledger, clock: Clock
) -> None:
    account = ledger.open_account("a", "EUR").account_id
    first = ledger.deposit(account, 5, request_id="r-1")
    clock.advance(WINDOW - 1)
    assert ledger.deposit(account, 5, request_id="r-1") == replace(first, replayed=True)
    with pytest.raises(IdempotencyConflict):
        ledger.deposit(account, 6, request_id="r-1")
    clock.advance(1)  # the window has passed (and nothing was purged): the id is new
    again = ledger.deposit(account, 6, request_id="r-1")
    assert not again.replayed and again.position > first.position
    assert ledger.account(account).balance == 11
    # the new record has a window of its own
    clock.advance(WINDOW - 1)
    assert ledger.deposit(account, 6, request_id="r-1") == replace(again, replayed=True)
    assert ledger.request_purge.purge() == 1  # the token of the batch that opened the account
    assert ledger.request_purge.report().kept == 1  # the new record of "r-1"


def test_refusals_are_kept_for_the_window_too(ledger: Ledger, clock: Clock) -> None:
    account = ledger.open_account("a", "EUR").account_id
    with pytest.raises(Exception, match="cannot debit"):
        ledger.withdraw(account, 5, request_id="w-1")
    ledger.deposit(account, 10)
    clock.advance(WINDOW - 1)
    with pytest.raises(Exception, match="cannot debit"):
        ledger.withdraw(account, 5, request_id="w-1")  # the recorded refusal, replayed
    clock.advance(1)
    assert not ledger.withdraw(account, 5, request_id="w-1").replayed


def test_generated_ids_get_one_record_per_batch_kept_only_for_the_ledgers_own_retries(
    ledger: Ledger, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = ledger.open_account("a", "EUR", request_id="open").account_id
    for _ in range(20):
        ledger.deposit(account, 1)  # a batch each
    recorder = ledger.service.recorder
    insert = recorder.insert_events
    commits: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        commits.append(1)
        return insert(*args, **kwargs)

    monkeypatch.setattr(recorder, "insert_events", counted)
    outcomes = ledger.submit([Deposit(account, 1) for _ in range(300)])
    assert all(isinstance(o, Receipt) for o in outcomes)
    assert 1 <= len(commits) < 30, commits  # the submission went in a few batches
    purge = ledger.request_purge
    assert purge.report().expired == 0
    clock.advance(GENERATED_RETENTION)
    report = purge.report()
    # one record per batch, not one per command: 20 + the submission's batches, not 320
    assert (report.generated, report.caller, report.kept) == (20 + len(commits), 0, 1)
    assert purge.purge() == 20 + len(commits)
    assert purge.report().kept == 1 and purge.report().expired == 0
    clock.advance(WINDOW)
    assert purge.purge() == 1
    report = purge.report()
    assert (report.expired, report.kept) == (0, 0)  # nothing left: storage is bounded


def test_purge_deletes_in_bounded_batches(ledger: Ledger, clock: Clock) -> None:
    account = ledger.open_account("a", "EUR").account_id
    for number in range(25):
        ledger.deposit(account, 1, request_id=f"d-{number}")
    clock.advance(WINDOW)
    recorder = ledger.service.recorder
    counts = [recorder.purge_requests(clock.now, 10) for _ in range(4)]  # type: ignore[attr-defined]
    assert counts == [10, 10, 6, 0]  # 25 deposits and the token of the account's batch
    assert ledger.account(account).balance == 25  # events are never purged


def test_a_caller_cannot_reuse_a_generated_id(ledger: Ledger, clock: Clock) -> None:
    account = ledger.open_account("a", "EUR").account_id
    generated = ledger.deposit(account, 5).request_id
    with pytest.raises(IdempotencyConflict) as caught:
        ledger.deposit(account, 5, request_id=generated)
    assert "generated by the ledger" in str(caught.value)
    clock.advance(WINDOW + GENERATED_RETENTION)  # no record is needed to tell: never
    with pytest.raises(IdempotencyConflict, match="generated by the ledger"):
        ledger.deposit(account, 5, request_id=generated)
    assert ledger.account(account).balance == 5


def test_the_purge_service_deletes_on_its_own(store_url: str, clock: Clock) -> None:
    settings = Settings.load(url=store_url, request_purge_interval=timedelta(seconds=0.01))
    with open_ledger(settings=settings, clock=clock) as ledger:
        account = ledger.open_account("a", "EUR").account_id
        for number in range(30):
            ledger.deposit(account, 1, request_id=f"d-{number}")
        ledger.request_purge.batch = 7  # several batches per pass
        clock.advance(WINDOW)
        deadline = time.monotonic() + 60
        while ledger.request_purge.deleted < 31:
            assert time.monotonic() < deadline, "the purge service never got to them"
            time.sleep(0.01)
        assert ledger.request_purge.health().state is ServiceState.RUNNING
        assert ledger.request_purge.report().kept == 0
    assert ledger.request_purge.health().state is ServiceState.STOPPED


@pytest.mark.postgres
@pytest.mark.parametrize("ahead", [0.0, 2 * 3600.0])  # 0: the clocks agree, for contrast
def test_a_purge_on_a_host_whose_clock_is_ahead_leaves_the_tokens_writers_still_need(
    pg_url: str, ahead: float, caplog: pytest.LogCaptureFixture
) -> None:
    """Host P's system clock is two hours ahead (it keeps its RTC in local time, at UTC+2);
    host A's agrees with the database's. On A, a batch of commands without request ids
    commits, but its answer is lost; A's own retry looks up the batch's token. P's purge
    ran in between and deleted the token (kept one hour) as expired by P's clock: the retry
    found no token, fenced the batch as never committed and applied the deposit again. A
    purge on the system clock now deletes nothing the database's clock does not say has
    expired, and says in its log that its host's clock is ahead."""
    from eventsourcing.persistence import OperationalError

    settings = Settings.load(url=pg_url, request_purge_interval=timedelta(0))
    writer = open_ledger(settings=settings, clock=Clock(time.time()))
    purger = open_ledger(settings=settings)  # on the host's system clock...
    purger.service.clock = lambda: datetime.now(UTC) + timedelta(seconds=ahead)  # ...ahead
    try:
        account = writer.open_account("a", "EUR").account_id
        recorder = writer.service.recorder
        insert = recorder.insert_events
        commits: list[int] = []

        def committed_but_answer_lost(*args: Any, **kwargs: Any) -> Any:
            commits.append(1)
            stored = insert(*args, **kwargs)
            if len(commits) == 1:
                purger.request_purge.purge()  # P's purge, between the commit and the retry
                raise OperationalError("server closed the connection unexpectedly")
            return stored

        recorder.insert_events = committed_but_answer_lost  # type: ignore[method-assign]
        (outcome,) = writer.submit([Deposit(account, 10)])  # a generated id: a batch token
        recorder.insert_events = insert  # type: ignore[method-assign]
        balance = writer.account(account).balance
        report = purger.request_purge.report()  # what P's dry run would say
    finally:
        writer.close()
        purger.close()
    assert commits, "the commit went through the scripted lost answer"
    assert isinstance(outcome, Receipt), outcome
    assert (balance, outcome.position) == (10, 2), "the retry applied the deposit again"
    assert (report.expired, report.kept) == (0, 2)  # both batches' tokens, for an hour
    warned = [m for r in caplog.records if "ahead of the database" in (m := r.getMessage())]
    assert len(warned) == (1 if ahead else 0), warned  # once, not at every purge


@pytest.mark.postgres
def test_a_host_whose_clock_is_behind_the_databases_is_told_so(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A host two hours behind writes batch tokens that expire early by the database's
    clock, so a purge anywhere can delete one its retry still needs: the host that can do
    harm is the one told, once."""
    settings = Settings.load(url=pg_url, request_purge_interval=timedelta(0))
    with open_ledger(settings=settings) as ledger:
        ledger.service.clock = lambda: datetime.now(UTC) - timedelta(hours=2)
        for _ in range(2):
            ledger.request_purge.purge()
    warned = [m for r in caplog.records if "behind the database" in (m := r.getMessage())]
    assert len(warned) == 1, warned


@pytest.mark.postgres
def test_the_command_line_on_a_host_ahead_deletes_only_what_the_database_says_expired(
    pg_url: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings.load(url=pg_url, request_purge_interval=timedelta(0))
    with open_ledger(settings=settings, clock=Clock(time.time())) as writer:
        account = writer.open_account("a", "EUR").account_id
        assert account is not None
        writer.deposit(account, 1, request_id="d-1")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 2 * 3600.0)  # this host: 2 h ahead
    assert main(["requests", "purge", "--dry-run", "--url", pg_url]) == 0
    assert "nothing to delete" in capsys.readouterr().out
    assert any("ahead of the database" in r.getMessage() for r in caplog.records)
    assert main(["requests", "purge", "--url", pg_url]) == 0
    assert "nothing to delete" in capsys.readouterr().out


class _DatabaseAt:
    """A request log whose database answers ``time``."""

    def __init__(self) -> None:
        self.time = 0.0

    def database_time(self) -> float:
        return self.time


def test_a_clock_hovering_at_the_tolerance_is_said_to_be_off_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    check, database, now = ClockCheck(), _DatabaseAt(), 1_000_000.0
    for offset in (60.5, 59.5, 60.5, 59.5, 60.5, -0.5, -60.5, -59.5, -60.5):
        database.time = now - offset
        assert check.purge_time(database, now) == min(now, database.time)  # type: ignore[arg-type]
        now += 60
    said = [r.getMessage().split(":")[0] for r in caplog.records if "clock is" in r.getMessage()]
    assert said == ["this host's clock is 60 s ahead of the database's",
                    "this host's clock is 60 s behind the database's"]  # fmt: skip


def drop_requests_table(url: str) -> None:
    if url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(url)) as conn:
            conn.execute("DROP TABLE daybook_requests")
        return
    with psycopg.connect(postgres_params(url).conninfo(), autocommit=True) as conn:
        conn.execute("DROP TABLE daybook_requests")


def test_a_purge_service_that_cannot_work_says_so(shared_store_url: str, clock: Clock) -> None:
    settings = Settings.load(url=shared_store_url, request_purge_interval=timedelta(seconds=0.01))
    with open_ledger(settings=settings, clock=clock) as ledger:
        drop_requests_table(shared_store_url)  # a bug or an operator's mistake, not an outage
        deadline = time.monotonic() + 60
        while ledger.request_purge.health().state is not ServiceState.FAILED:
            assert time.monotonic() < deadline, ledger.request_purge.health()
            time.sleep(0.01)
        assert "daybook_requests" in (ledger.request_purge.health().error or "")


#: The request records' table as daybook 0.2 wrote it, before records expired: (SQLite,
#: PostgreSQL).
OLD_REQUESTS_TABLE = (
    "CREATE TABLE daybook_requests (request_id TEXT PRIMARY KEY, command TEXT NOT NULL, "
    "fingerprint TEXT NOT NULL, outcome BLOB NOT NULL)",
    "CREATE TABLE daybook_requests (request_id text PRIMARY KEY, command text NOT NULL, "
    "fingerprint text NOT NULL, outcome jsonb NOT NULL, last_originator_id uuid, "
    "last_originator_version bigint, recorded_at timestamptz NOT NULL DEFAULT now())",
)


class Database:
    """A SQLite file or a PostgreSQL database that a test writes with plain SQL and then
    compares, whole, before and after a command."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = url.startswith("sqlite")

    def execute(self, *statements: str) -> None:
        if self.sqlite:
            with sqlite3.connect(sqlite_path(self.url)) as conn:
                for statement in statements:
                    conn.execute(statement)
            return
        with psycopg.connect(postgres_params(self.url).conninfo(), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]

    def snapshot(self) -> Any:
        """Everything in it: the file's bytes; the server's tables, columns, indexes,
        functions and request records."""
        if self.sqlite:
            path = sqlite_path(self.url)
            folder = sorted(p.name for p in path.parent.iterdir())
            return folder, path.read_bytes()
        queries = [
            "SELECT table_name, column_name, column_default FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY 1, 2",
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'public' ORDER BY 1",
            "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
            "WHERE n.nspname = 'public' ORDER BY 1",
        ]
        with psycopg.connect(postgres_params(self.url).conninfo(), autocommit=True) as conn:
            found = [conn.execute(query).fetchall() for query in queries]  # type: ignore[arg-type]
            if ("daybook_requests", "request_id", None) in found[0]:
                found.append(conn.execute("SELECT * FROM daybook_requests ORDER BY 1").fetchall())
        return found


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """An empty database (a SQLite file with no tables)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/old.db"
        sqlite3.connect(sqlite_path(url)).close()
        return Database(url)
    return Database(str(request.getfixturevalue("pg_url")))


def test_the_command_line_shows_what_would_go_then_deletes_it(
    database: Database, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = database.url
    clock = Clock()  # in 1970: by the system clock, every record has expired long ago
    settings = Settings.load(url=url, request_purge_interval=timedelta(0))
    with open_ledger(settings=settings, clock=clock) as ledger:
        account = ledger.open_account("a", "EUR").account_id
        for number in range(3):
            ledger.deposit(account, 1, request_id=f"d-{number}")
    before = database.snapshot()
    assert main(["requests", "purge", "--dry-run", "--url", url]) == 0
    assert database.snapshot() == before  # a dry run changes nothing
    out = capsys.readouterr().out
    assert "would delete 4 expired request records (3 of caller-chosen ids" in out
    assert "1 batch token of generated ids" in out
    monkeypatch.setattr("daybook.infrastructure.ledger.cli.PROGRESS_EVERY", 0.0)
    assert main(["requests", "purge", "--url", url, "--batch-size", "2"]) == 0
    said = capsys.readouterr()
    assert "deleted 4 of 4 expired request records" in said.out
    assert "; took " in said.out
    assert "deleted 2 of 4 so far" in said.err  # a long purge says how far it got
    assert main(["requests", "purge", "--dry-run", "--url", url]) == 0
    assert "nothing to delete" in capsys.readouterr().out


def test_a_purge_that_deletes_what_expired_while_it_ran_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records go on expiring during a long purge, and it deletes those too: it said
    "deleted 6 of 4 expired request records"."""
    from daybook.infrastructure.ledger import cli
    from daybook.infrastructure.ledger.requests import PurgeReport

    class Purge:
        def purge(self, progress: Callable[[int], None]) -> int:
            for count in (2, 4, 6):
                progress(count)
            return 6

    monkeypatch.setattr(cli, "PROGRESS_EVERY", 0.0)
    assert cli._purge(Purge(), PurgeReport(caller=3, generated=1, kept=10)) == 0
    said = capsys.readouterr()
    assert "deleted 6 expired request records: the 4 counted as it began" in said.out
    assert "and 2 that expired while it ran; 10 were kept when it began" in said.out
    lines = [line.partition(" so far")[0] for line in said.err.splitlines()]
    assert lines == [
        "daybook requests purge: deleted 2 of 4",
        "daybook requests purge: deleted 4 of 4",
        "daybook requests purge: deleted 6",
    ], said.err


def test_a_dry_run_on_a_database_from_before_expiry_changes_nothing(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dry run "counts what would be deleted; deletes nothing": on a request table written
    before records expired it migrates nothing (no new columns, no window given to the old
    records, no event tables), and says what a real purge would do."""
    database.execute(
        OLD_REQUESTS_TABLE[0 if database.sqlite else 1],
        "INSERT INTO daybook_requests (request_id, command, fingerprint, outcome) "
        "VALUES ('old-1', 'withdraw', 'f1', '{}'), ('old-2', 'deposit', 'f2', '{}')",
    )
    before = database.snapshot()
    assert main(["requests", "purge", "--dry-run", "--url", database.url]) == 0
    assert database.snapshot() == before
    out = capsys.readouterr().out
    assert "nothing to delete" in out
    assert "2 request records predate record expiry" in out
    assert "a real purge (or starting daybook) first" in out
    # A real purge migrates the table, as a ledger opening the database would, and says so:
    # the old records are kept for one window from now.
    assert main(["requests", "purge", "--url", database.url]) == 0
    out = capsys.readouterr().out
    assert "migrated the request table from before record expiry: its 2 records" in out
    assert "nothing to delete: none of the 2 request records has expired" in out
    assert database.snapshot() != before


def test_a_dry_run_on_a_database_without_daybook_tables_creates_none(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    before = database.snapshot()
    for dry_run in (["--dry-run"], []):  # a real purge has nothing to do either
        assert main(["requests", "purge", *dry_run, "--url", database.url]) == 0
        assert database.snapshot() == before
        assert "nothing to delete: there are no request records" in capsys.readouterr().out


def test_what_a_dry_run_reads_through_cannot_write(database: Database) -> None:
    from daybook.infrastructure.bootstrap import read_only_recorder

    settings = Settings.load(url=database.url, request_purge_interval=timedelta(0))
    with open_ledger(settings=settings, clock=Clock()) as ledger:
        ledger.open_account("a", "EUR")
    before = database.snapshot()
    with read_only_recorder(settings) as recorder:
        assert recorder.expired_requests(time.time()).generated == 1
        with pytest.raises(Exception, match=r"read-?only"):
            recorder.purge_requests(time.time(), 10)
    assert database.snapshot() == before


def test_a_dry_run_of_a_missing_sqlite_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/missing.db"
    assert main(["requests", "purge", "--dry-run", "--url", url]) != 0
    assert "there is no database at" in capsys.readouterr().err
    assert not sqlite_path(url).exists()


def test_the_window_is_a_setting() -> None:
    assert Settings.load(env={}).request_retention == timedelta(hours=72)
    assert Settings.load(env={"DAYBOOK_REQUEST_RETENTION": "P7D"}).request_retention == (
        timedelta(days=7)
    )
    assert Settings.load(env={"DAYBOOK_REQUEST_RETENTION": "86400"}).request_retention == (
        timedelta(days=1)
    )
    with pytest.raises(BadSettings, match=r"request_retention.*at least 1 hour"):
        Settings.load(env={"DAYBOOK_REQUEST_RETENTION": "60"})
    for endless in ("inf", "1e20"):
        for variable in ("DAYBOOK_REQUEST_RETENTION", "DAYBOOK_REQUEST_PURGE_INTERVAL"):
            with pytest.raises(BadSettings, match="longer than any duration"):
                Settings.load(env={variable: endless})


@pytest.mark.postgres
def test_records_written_before_they_expired_get_one_window_from_the_upgrade(
    pg_url: str,
) -> None:
    """A PostgreSQL database written by daybook 0.2, whose request records had no expiry."""
    from uuid import UUID

    from daybook.domain.accounts import Withdraw

    refused = Withdraw(UUID(int=7), 5, request_id="old-request")
    with psycopg.connect(postgres_params(pg_url).conninfo(), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE daybook_requests (request_id text PRIMARY KEY, command text NOT NULL, "
            "fingerprint text NOT NULL, outcome jsonb NOT NULL, last_originator_id uuid, "
            "last_originator_version bigint, recorded_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(
            "INSERT INTO daybook_requests (request_id, command, fingerprint, outcome) "
            "VALUES (%s, 'withdraw', %s, %s)",
            (
                "old-request",
                refused.fingerprint,
                # not what the same command would meet today: so a replay is told apart
                '{"error": {"code": "insufficient_funds", "message": "recorded by daybook '
                '0.2", "details": {}}}',
            ),
        )
    clock = Clock(time.time())
    settings = Settings.load(url=pg_url, request_purge_interval=timedelta(0))
    with open_ledger(settings=settings, clock=clock) as ledger:
        with pytest.raises(Exception, match=r"recorded by daybook 0\.2") as caught:
            ledger.execute(refused)
        assert getattr(caught.value, "code", None) == "insufficient_funds"
        assert ledger.request_purge.report().kept == 1
        clock.advance(WINDOW + 60)
        assert ledger.request_purge.report().caller == 1
        assert ledger.request_purge.purge() == 1
