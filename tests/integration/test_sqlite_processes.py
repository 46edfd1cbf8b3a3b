"""Several processes on one SQLite file: writers side by side, one killed mid-stream, and
short-lived ones (CLI commands, scripts) beside a long-running one."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from daybook import open_ledger, open_read_models
from daybook.infrastructure.urls import sqlite_file_problem
from tests.integration import test_concurrency as tc

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _forget_prepared() -> Iterator[None]:
    """``test_concurrency.prepare`` keeps each ledger it opens, for its own module to close:
    these tests close theirs, and the list is emptied after each."""
    yield
    while tc._prepared:
        tc._prepared.pop().close()


def _records(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT request_id, command FROM daybook_requests").fetchall()
    return {request_id: command for request_id, command in rows}


def _in_another_process(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_four_processes_on_one_sqlite_file_never_break_an_invariant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ``test_concurrency`` does on PostgreSQL: no overdraft, no oversell, every
    receipt's events in the log once, every refusal one the invariants explain."""
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    monkeypatch.setattr(tc, "recorded_requests", lambda _url: _records(path))
    ledger, accounts = tc.prepare(url)
    try:
        processes = [tc.writer(url, accounts, f"p{n}", count=150, threads=2) for n in range(4)]
        outcomes = [line for process in processes for line in tc.lines(process)]
        for process in processes:
            assert process.wait(timeout=240) == 0
        receipts = [o for o in outcomes if "position" in o]
        refusals = [o for o in outcomes if "refused" in o]
        assert len(receipts) + len(refusals) == 4 * 2 * 150, outcomes[-5:]
        assert {r["refused"] for r in refusals} <= {"insufficient_funds", "out_of_stock"}
        tc.check_log(ledger, url, accounts, receipts)
    finally:
        ledger.close()


def test_a_ledger_with_read_models_keeps_its_sqlite_file_shared(tmp_path: Path) -> None:
    """A process holding a ledger and read models on one SQLite file (``daybook serve``, an
    embedding service with ``run_projections``), and a short-lived process reading the file
    (``daybook balance``): the second one's exit must not take the WAL away from the first,
    whose commits every other process must still see. Reading the file's first bytes to
    check it was SQLite closed a descriptor of it, which drops every POSIX lock the process
    holds on the file, its SQLite connections' too: the other process, closing, took the
    file for unused and deleted the WAL under the first, whose commits nobody else saw
    (a second process withdrew the money again; the file ended corrupted)."""
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    with open_ledger(url) as ledger:
        account = ledger.open_account("ann", "EUR").account_id
        ledger.deposit(account, 100)
        open_read_models(url).close()  # as serve or run_projections open their read models
        # Another process reads the file and exits (a CLI command, a backup script...).
        _in_another_process(
            f"import sqlite3; c = sqlite3.connect({str(path)!r}); "
            "c.execute('SELECT count(*) FROM stored_events').fetchall(); c.close()"
        )
        wal_kept = os.path.exists(f"{path}-wal")
        ledger.withdraw(account, 100)
        # Another ledger process must see that withdrawal: the money is gone.
        said = _in_another_process(
            "from uuid import UUID\n"
            "from daybook import open_ledger\n"
            "from daybook.domain.errors import DomainError\n"
            f"with open_ledger({url!r}) as other:\n"
            "    try:\n"
            f"        other.withdraw(UUID({str(account)!r}), 100)\n"
            "        print('withdrew again')\n"
            "    except DomainError as error:\n"
            "        print(error.code)\n"
        )
        assert (wal_kept, said) == (True, "insufficient_funds")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_writer_killed_mid_stream_leaves_nothing_half_done_and_its_retries_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL while four threads write: every receipt's events are in the log, the file
    is intact, and the same requests sent again replay."""
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    monkeypatch.setattr(tc, "recorded_requests", lambda _url: _records(path))
    ledger, accounts = tc.prepare(url)
    try:
        process = tc.writer(url, accounts, "k", count=5000, threads=4)
        receipts = []
        for line in tc.lines(process):
            if "position" in line:
                receipts.append(line)
            if len(receipts) >= 300:
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=30)
        tc.check_log(ledger, url, accounts, receipts)
        # Retried after the crash, each receipt's request replays.
        again = tc.writer(url, accounts, "k", count=40, threads=4)
        for line in tc.lines(again):
            if "position" in line and any(r["request_id"] == line["request_id"] for r in receipts):
                assert line["replayed"], line
        assert again.wait(timeout=60) == 0
    finally:
        ledger.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_the_file_check_takes_a_file_another_process_holds_locked_at_once(
    tmp_path: Path,
) -> None:
    """The check reads the file through SQLite: a database another process holds an
    exclusive lock on is SQLite, in use, and accepted at once (not after a busy timeout,
    then refused "database is locked")."""
    path = tmp_path / "held.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sqlite3, time\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); c.execute('INSERT INTO t VALUES (1)')\n"
            "print('held', flush=True); time.sleep(60)\n"
        )],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        problem = sqlite_file_problem(path)
    finally:
        holder.kill()
        holder.wait()
    # (Waiting out a busy timeout, it was refused "database is locked" after it.)
    assert problem is None, problem
    (tmp_path / "not.db").write_bytes(b"not a database, at all" * 10)
    assert (
        sqlite_file_problem(tmp_path / "not.db")
        == f"{str(tmp_path / 'not.db')!r} is not a SQLite database; check the path"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run the check as another user")
def test_the_file_check_takes_a_wal_file_in_a_folder_the_user_may_not_write() -> None:
    """A WAL file, closed cleanly (no -wal, no -shm), that the user may read in a folder
    it may not write: SQLite cannot make the shared memory for a read-only look at it, and
    says so; the file is SQLite all the same."""
    folder = Path(tempfile.mkdtemp(prefix="daybook-ro-"))
    try:
        path = folder / "w.db"
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE t (x)")
            conn.commit()
        folder.chmod(0o755)
        path.chmod(0o644)
        check = (
            "import sys; from pathlib import Path; "
            "from daybook.infrastructure.urls import sqlite_file_problem as p; "
            "print(p(Path(sys.argv[1])))"
        )
        as_nobody = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-c", check, str(path)],
            capture_output=True, text=True, check=False, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert as_nobody.stdout.strip() == "None", as_nobody.stdout + as_nobody.stderr[-500:]
    finally:
        shutil.rmtree(folder)
