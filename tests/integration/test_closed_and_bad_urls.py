"""What an embedding service's mistakes meet: a ledger used after ``close``, and a read-model
URL no store takes."""

from __future__ import annotations

from pathlib import Path

import pytest

import daybook
from daybook import open_ledger, run_projections


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
def test_a_closed_ledger_refuses_commands_and_reads_with_a_stable_code(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A request handler that outlives the service's shutdown: its command, and (on a store
    that ``close`` released) its read, raise ``daybook.LedgerClosed``, code
    ``ledger_closed``; reads failed with an empty ``ConnectionPoolClosedError``. In memory
    the log stays readable."""
    if kind == "memory":
        url = "memory://"
    elif kind == "sqlite":
        url = f"sqlite:///{tmp_path}/closed.db"
    else:
        url = request.getfixturevalue("pg_url")
    ledger = open_ledger(url)
    account = ledger.open_account("a", "EUR").account_id
    ledger.close()
    calls = [lambda: ledger.deposit(account, 1)]
    if kind != "memory":
        calls += [lambda: ledger.account(account), lambda: ledger.head()]
    for call in calls:
        with pytest.raises(daybook.LedgerClosed) as refused:
            call()
        assert refused.value.code == "ledger_closed"
        assert "closed" in str(refused.value)


def test_run_projections_refuses_a_bad_read_model_url_before_starting() -> None:
    """A URL no store takes is the caller's mistake: refused by the call, not left to a
    background thread that fails (with a traceback in the log) while the block goes on."""
    with open_ledger("memory://") as ledger:
        runner = None
        try:
            with pytest.raises(Exception) as refused:
                runner = run_projections(ledger, "mysql://nowhere/x")
        finally:
            if runner is not None:
                runner.stop()
        assert "mysql" in str(refused.value)


@pytest.mark.parametrize("name", ["file:x.db", "file:x.db?mode=ro"])
def test_a_sqlite_path_that_reads_as_a_uri_is_the_file_named(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite takes a name starting with ``file:`` for a URI (``file:x.db`` is ``x.db``); the
    event store opened it so, while the path checks, the read models and the tokens used the
    file named: the ledger wrote to one file and everything else looked at another."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{name}"
    with open_ledger(url) as ledger, run_projections(ledger, url) as runner:
        account = ledger.open_account("a", "EUR").account_id
        receipt = ledger.deposit(account, 5)
        row = runner.views.balance(account, min_position=receipt.position, timeout=30)
        assert row is not None and row.balance == 5
    assert (tmp_path / name).stat().st_size > 0
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("name", [":memory:", "mode=memory.db", "data/mode=memory"])
def test_a_sqlite_path_that_reads_as_memory_is_refused(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """eventsourcing takes a SQLite name that holds ``:memory:`` or ``mode=memory`` for a
    database in memory (and SQLite ``:memory:`` itself): a ledger that seemed to write to a
    file kept nothing. Refused with the URL, saying to use ``memory://``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(daybook.BadURL) as refused:
        open_ledger(f"sqlite:///{name}")
    assert refused.value.code == "bad_url"
    assert "memory://" in str(refused.value)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


@pytest.mark.parametrize("opener", ["open_ledger", "open_read_models", "run_projections"])
def test_an_unknown_scheme_is_bad_url_at_every_entry_point(opener: str) -> None:
    """The same URL had another code by the entry point that checked it: ``bad_settings``
    from ``open_ledger`` (its settings check), ``bad_url`` from ``open_read_models``."""
    with pytest.raises(daybook.BadURL) as refused:
        if opener == "run_projections":
            with open_ledger("memory://") as ledger:
                run_projections(ledger, "mysql://h/db")
        else:
            getattr(daybook, opener)("mysql://h/db")
    assert refused.value.code == "bad_url", refused.value
    assert "mysql" in str(refused.value)
