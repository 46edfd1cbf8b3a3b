"""Several writer processes on one PostgreSQL database, writers killed mid-stream, and ledgers
opening one new SQLite file at once.

Writers are real processes (``tests/integration/writer.py``) printing each outcome only after
the ledger returned it, so a printed receipt is one a caller really received.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest

from daybook import Ledger, open_ledger
from daybook.domain.commands import command_named
from daybook.domain.errors import DomainError
from daybook.domain.ids import is_generated_request_id
from daybook.infrastructure.ledger.requests import BATCH_TOKEN
from daybook.infrastructure.urls import postgres_params
from tests.pg_locks import deadlocks_once_all_sessions_ended, waits_or_finishes
from tests.together import failures_together

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
START_BALANCE = 10_000
START_STOCK = 200
SKUS = ["SKU-A", "SKU-B", "SKU-C"]


_prepared: list[Ledger] = []


@pytest.fixture(autouse=True)
def _close_prepared(pg_url: str) -> Iterator[None]:
    """Each test's ledger is closed after it (its request purge and committer stop), before
    its database is dropped (this fixture depends on ``pg_url``, so it ends first)."""
    yield
    while _prepared:
        _prepared.pop().close()


def prepare(url: str, accounts: int = 8) -> tuple[Ledger, list[UUID]]:
    ledger = open_ledger(url)
    _prepared.append(ledger)
    ids = [ledger.open_account(f"owner-{i}", "EUR").account_id for i in range(accounts)]
    for account in ids:
        ledger.deposit(account, START_BALANCE)
    for sku in SKUS:
        ledger.receive_stock(sku, START_STOCK)
    return ledger, ids


def writer(url: str, accounts: list[UUID], seed: str, **options: Any) -> subprocess.Popen[str]:
    setup = {
        "url": url,
        "seed": seed,
        "count": options.get("count", 200),
        "threads": options.get("threads", 2),
        "accounts": [str(a) for a in accounts],
        "skus": SKUS,
        "crash_before_commit": options.get("crash_before_commit"),
        "announce_commits": options.get("announce_commits", False),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.writer", json.dumps(setup)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def lines(process: subprocess.Popen[str]) -> Iterator[dict[str, Any]]:
    assert process.stdout is not None
    for line in process.stdout:
        yield json.loads(line)


def events_by_request(ledger: Ledger) -> dict[str, list[tuple[int, Any]]]:
    """Every event in the log, grouped by the request id in its metadata."""
    grouped: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    position = 0
    while batch := ledger.service.recorder.select_notifications(position + 1, 1000):
        for notification in batch:
            event = ledger.service.mapper.to_domain_event(notification)
            grouped[event.meta.request_id].append((notification.id, event))  # type: ignore[attr-defined]
            position = notification.id
    return grouped


def recorded_requests(url: str) -> dict[str, str]:
    """Every request record: request id (or batch token) -> its command."""
    with psycopg.connect(postgres_params(url).conninfo()) as conn:
        rows = conn.execute("SELECT request_id, command FROM daybook_requests").fetchall()
    return {request_id: command for request_id, command in rows}


def check_log(
    ledger: Ledger, url: str, accounts: list[UUID], receipts: list[dict[str, Any]]
) -> None:
    """Invariants hold, money and stock are conserved, every receipt is in the log exactly
    once, and every command in the log is whole (all its events, and its request record)."""
    balances = [ledger.account(a).balance for a in accounts]
    assert sum(balances) == START_BALANCE * len(accounts), "money was created or destroyed"
    assert min(balances) >= 0, "an account went below its overdraft limit"

    grouped = events_by_request(ledger)
    for request_id, events in grouped.items():
        kinds = sorted(type(e).__name__ for _, e in events)
        if kinds == ["TransferredIn", "TransferredOut"]:
            assert events[0][1].transfer_id == events[1][1].transfer_id
        else:
            assert len(events) in (1, 2), f"request {request_id} has events {kinds}"
    for sku in SKUS:
        stock = ledger.inventory(sku)
        assert stock.on_hand == START_STOCK
        assert 0 <= stock.reserved <= stock.on_hand
        assert stock.reserved == sum(stock.reservations.values())

    for receipt in receipts:
        events = grouped.get(receipt["request_id"])
        assert events, f"receipt {receipt['request_id']} is not in the log"
        # A transfer writes both accounts; a reservation, its SKU and its id's claim.
        expected = 2 if receipt["command"] in ("transfer", "reserve_stock") else 1
        assert len(events) == expected, f"receipt {receipt['request_id']} applied twice"
        assert receipt["position"] == max(position for position, _ in events)

    recorded = recorded_requests(url)
    in_log = {r for r in grouped if r is not None}
    chosen = {r for r in in_log if not is_generated_request_id(r)}  # every writer's
    assert chosen <= set(recorded), "events without the request record that commits with them"
    # Generated ids (the set-up's) have one record per batch: its token, with its events.
    tokens = [r for r, command in recorded.items() if command == BATCH_TOKEN]
    assert 1 <= len(tokens) <= len(in_log - chosen)


def test_four_processes_never_break_an_invariant(pg_url: str) -> None:
    ledger, accounts = prepare(pg_url)
    processes = [writer(pg_url, accounts, f"p{n}", count=150, threads=2) for n in range(4)]
    outcomes = [line for process in processes for line in lines(process)]
    for process in processes:
        assert process.wait(timeout=120) == 0
    receipts = [o for o in outcomes if "position" in o]
    refusals = [o for o in outcomes if "refused" in o]
    assert len(receipts) + len(refusals) == 4 * 2 * 150
    assert {r["refused"] for r in refusals} <= {"insufficient_funds", "out_of_stock"}
    # Each thread's first transfer asks for more than all the money there is.
    assert len(refusals) >= 4 * 2
    assert not any(r["replayed"] for r in receipts)
    check_log(ledger, pg_url, accounts, receipts)


def test_sigkill_mid_stream_loses_no_receipt_and_leaves_no_half_command(pg_url: str) -> None:
    ledger, accounts = prepare(pg_url)
    process = writer(pg_url, accounts, "k", count=5000, threads=4)
    receipts = []
    for line in lines(process):
        if "position" in line:
            receipts.append(line)
        if len(receipts) >= 150:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    check_log(ledger, pg_url, accounts, receipts)


def test_sigkill_inside_a_group_commit_before_it_is_sent(pg_url: str) -> None:
    """Killed inside a group commit (batch applied, statement built, nothing sent): every
    caller told success finds its events in the log, none of the batch's callers do."""
    ledger, accounts = prepare(pg_url)
    process = writer(pg_url, accounts, "w", count=500, threads=8, crash_before_commit=25)
    outcomes = list(lines(process))
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    # The commands of the killed commit (several: the writer kills a group commit).
    in_flight = next(o["crashing"] for o in outcomes if "crashing" in o)
    receipts = [o for o in outcomes if "position" in o]
    told = {r["request_id"] for r in receipts}
    assert not told & set(in_flight), "a caller was told success before its commit"
    grouped = events_by_request(ledger)
    assert not set(in_flight) & set(grouped), "events of the killed commit are in the log"
    assert not set(in_flight) & set(recorded_requests(pg_url))
    check_log(ledger, pg_url, accounts, receipts)
    # The ledger keeps working for a new process after the crash.
    assert ledger.transfer(accounts[0], accounts[1], 1).position > 0


def test_sigkill_after_a_group_commit_was_sent_loses_nothing_and_retries_replay(
    pg_url: str,
) -> None:
    """Killed while its commit statement waits on the server: the server still commits the
    whole batch although no caller was told. Retrying those requests (same ids, same
    payloads) from another process replays their outcomes; nothing is applied twice."""
    ledger, accounts = prepare(pg_url)
    process = writer(pg_url, accounts, "s", count=2000, threads=8, announce_commits=True)
    outcomes: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: outcomes.extend(lines(process)), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while sum("position" in o for o in outcomes) < 50:
        assert time.monotonic() < deadline and process.poll() is None, "the writer stalled"
        time.sleep(0.01)
    conninfo = postgres_params(pg_url).conninfo()
    appends = (
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%daybook_append%' "
        "AND pid <> pg_backend_pid() AND "
    )
    waiting, running = appends + "wait_event_type = 'Lock'", appends + "state = 'active'"
    with psycopg.connect(conninfo) as locker, psycopg.connect(conninfo, autocommit=True) as watch:
        # Hold the events table: the writer's next commit statement reaches the server and
        # waits there for the lock, mid-transaction. Until that commit carries several
        # callers' commands (a busy machine may send one alone), let it through and try
        # again.
        for _ in range(50):
            locker.execute("LOCK TABLE daybook_events IN EXCLUSIVE MODE")
            while watch.execute(waiting).fetchone() != (1,):
                assert time.monotonic() < deadline, "no commit came to wait on the lock"
                time.sleep(0.01)
            # Its "sending" line was written before the statement went out, and no later
            # commit can send before it ends: once the output stops growing (the last
            # answers of the commit before it printed), the last "sending" line is its.
            seen = -1
            while seen != len(outcomes):
                seen = len(outcomes)
                assert time.monotonic() < deadline, "the writer's output never settled"
                time.sleep(0.5)
            unanswered = [o for o in outcomes if "sending" in o][-1]["sending"]
            if len(unanswered) > 1:
                break
            locker.rollback()
        else:
            raise AssertionError("no commit of several commands came in 50 tries")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        reader.join(timeout=30)
        locker.rollback()  # the statement of the dead process goes on, and commits
        while watch.execute(running).fetchone() != (0,):
            assert time.monotonic() < deadline, "the orphaned commit never finished"
            time.sleep(0.01)
    assert process.returncode == -signal.SIGKILL
    assert unanswered == [o for o in outcomes if "sending" in o][-1]["sending"]
    receipts = [o for o in outcomes if "position" in o]
    told = {o["request_id"] for o in outcomes if "position" in o or "refused" in o}
    assert not told & {r["request_id"] for r in unanswered}, "nobody heard about that commit"
    assert {r["request_id"] for r in unanswered} <= set(recorded_requests(pg_url)), "it committed"
    check_log(ledger, pg_url, accounts, receipts)

    head = ledger.head()
    balances = [ledger.account(a).balance for a in accounts]
    recorded = ledger.service.recorder.select_requests([r["request_id"] for r in unanswered])
    for request in unanswered:
        build = command_named(request["command"])
        payload = {
            k: UUID(v) if k in ("source", "destination") else v
            for k, v in request["payload"].items()
        }
        (outcome,) = ledger.service.execute([build(**payload, request_id=request["request_id"])])
        original = recorded[request["request_id"]].outcome
        if isinstance(outcome, DomainError):
            assert original["error"]["code"] == outcome.code, request
        else:
            assert outcome.replayed and original["receipt"]["position"] == outcome.position
    assert ledger.head() == head, "a retry applied a request a second time"
    assert [ledger.account(a).balance for a in accounts] == balances


def test_processes_starting_at_once_on_a_fresh_database_all_start(
    pg_admin_url: str,
) -> None:
    """Creating the tables is serialised: concurrent CREATE TYPE / CREATE FUNCTION would
    otherwise fail with 'tuple concurrently updated'."""
    from scripts import services

    code = "import sys; from daybook import open_ledger; open_ledger(sys.argv[1]).close()"
    for round_number in range(3):
        name = f"daybook_fresh_{os.getpid()}_{round_number}"
        url = services.create_database(pg_admin_url, name)
        starting = [
            subprocess.Popen(
                [sys.executable, "-c", code, url],
                cwd=ROOT,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            for _ in range(6)
        ]
        for process in starting:
            _, err = process.communicate(timeout=60)
            assert process.returncode == 0, err
        services.drop_database(pg_admin_url, name)


def test_a_process_starting_while_others_write_deadlocks_nobody(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process starting (a deploy, a restart) runs the event store's CREATE ... IF NOT EXISTS
    statements while other processes write. An index statement locks its table in SHARE
    mode even when the index exists. Had the statements run in one transaction, the start
    would hold the events table's lock while it waits for the request records' table, and a
    write holds the request records' table while it waits for the events table: PostgreSQL
    would end one of them with 'deadlock detected' (the write is retried; the start, in CI
    once, failed). Here a write arrives exactly between the two statements."""
    ledger, accounts = prepare(pg_url, accounts=2)
    starter = threading.current_thread()
    outcomes: dict[str, Any] = {}

    def write() -> None:
        try:
            outcomes["receipt"] = ledger.transfer(
                accounts[0], accounts[1], 5, request_id="written-during-a-start"
            )
        except Exception as error:  # reported by the assertion below
            outcomes["error"] = error

    def write_now_and_wait_until_it_waits_or_is_done() -> None:
        writing = threading.Thread(target=write)
        writing.start()
        outcomes["writer"] = writing
        waits_or_finishes(pg_url, writing, 1)

    execute = psycopg.Cursor.execute

    def execute_then_write(self: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        result = execute(self, query, *args, **kwargs)
        text = query.as_string(self) if hasattr(query, "as_string") else str(query)
        at_the_window = threading.current_thread() is starter and "CREATE UNIQUE INDEX" in text
        if at_the_window and "writer" not in outcomes:
            write_now_and_wait_until_it_waits_or_is_done()
        return result

    monkeypatch.setattr(psycopg.Cursor, "execute", execute_then_write)
    started = open_ledger(pg_url)
    monkeypatch.undo()
    assert "writer" in outcomes, "the start never created the events table's index"
    outcomes["writer"].join(timeout=30)
    assert "error" not in outcomes, outcomes.get("error")
    assert ledger.account(accounts[1]).balance == START_BALANCE + 5
    started.close()
    ledger.close()
    assert deadlocks_once_all_sessions_ended(pg_url) == 0


def test_ledgers_opening_a_new_sqlite_file_together_all_open(tmp_path: Path) -> None:
    """Services and processes started together open a new SQLite file at once. SQLite
    answers "database is locked" at once, not after its busy timeout, to a connection
    switching a new file to WAL while another does (eventsourcing's pool switches it as it
    connects): every ledger opens all the same."""

    def open_one(attempt: int) -> None:
        open_ledger(f"sqlite:///{tmp_path}/new-{attempt}.db").close()

    assert failures_together(open_one, rounds=100, threads=4) == []
