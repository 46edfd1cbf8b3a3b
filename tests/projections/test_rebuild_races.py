"""Rebuilds that meet another writer of the same version: on SQLite (no writer locks) two
rebuilds at once, one of them switching reads first."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest

from daybook import open_ledger, run_projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.readmodels import rebuild as rebuild_module
from daybook.infrastructure.readmodels.catalog import VersionState
from daybook.infrastructure.readmodels.rebuild import rebuild
from tests.projections.helpers import assert_tables_match, version_record, workload
from tests.projections.test_rebuild_reconcile import ACCOUNT_BALANCES_V2


def test_a_rebuild_whose_version_another_rebuild_switched_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite has no writer locks: a second `daybook projections rebuild` of the same version
    (or a runner with the new code) may finish it and switch reads first. The first must
    then end (the version is live), not loop for ever at full CPU."""
    url = f"sqlite:///{tmp_path}/daybook.db"
    with open_ledger(url) as ledger:
        workload(ledger, 150)
        with run_projections(ledger, url, poll_interval=0.01) as live:
            live.views.balance(
                ledger.open_account("x", "EUR").account_id, min_position=ledger.head(), timeout=30
            )
        log = event_log_of(ledger)
        rounds = [0]
        built = rebuild_module._built

        def counted(*args: Any) -> bool:
            rounds[0] += 1
            assert rounds[0] < 500, "the rebuild never ends: it loops on a version now live"
            return built(*args)

        monkeypatch.setattr(rebuild_module, "_built", counted)
        other = [False]

        class Output(io.StringIO):
            def write(self, text: str) -> int:
                # The first rebuild's last batch has committed at the head: another rebuild
                # of the same version (another terminal) finishes it and switches reads.
                if "#" * 30 in text and not other[0]:
                    other[0] = True
                    rebuild(log, url, ACCOUNT_BALANCES_V2, batch_size=20, stream=io.StringIO())
                return len(text)

        result = rebuild(log, url, ACCOUNT_BALANCES_V2, batch_size=20, stream=Output())
        assert other[0]
        assert result.version == 2
        record = version_record(url, "account_balances", 2)
        assert record is not None and record.state is VersionState.LIVE
        assert_tables_match(ledger, url, ACCOUNT_BALANCES_V2)


@pytest.mark.postgres
def test_a_rebuild_waiting_for_another_says_so_and_which_built_it(pg_url: str) -> None:
    """PostgreSQL: a second rebuild of the same version waits for the first (the version's
    lock). It waited in silence (for as long as the other's whole build), then said it had
    "built" the version, from 0 events. It now says it waits, and who built it."""
    import threading

    from daybook.infrastructure.readmodels.catalog import version_lock_key
    from daybook.infrastructure.readmodels.postgres import AdvisoryLocks
    from daybook.infrastructure.urls import postgres_params

    with open_ledger(pg_url) as ledger:
        workload(ledger, 150)
        log = event_log_of(ledger)
        held = AdvisoryLocks(postgres_params(pg_url).conninfo())
        key = version_lock_key(ACCOUNT_BALANCES_V2.name, ACCOUNT_BALANCES_V2.version)
        assert held.try_take(key)  # as a rebuild already under way holds it
        said = io.StringIO()
        results: list[Any] = []
        first = threading.Thread(
            target=lambda: results.append(
                rebuild(log, pg_url, ACCOUNT_BALANCES_V2, batch_size=20, stream=said)
            )
        )
        first.start()
        deadline = time.monotonic() + 60
        while "another process is building" not in said.getvalue():
            assert time.monotonic() < deadline, f"nothing said while waiting: {said.getvalue()!r}"
            time.sleep(0.05)
        held.release(key)
        held.close()
        # The lock is free: this one or the first takes it and builds; the other waits.
        results.append(
            rebuild(log, pg_url, ACCOUNT_BALANCES_V2, batch_size=20, stream=io.StringIO())
        )
        first.join(60)
        assert not first.is_alive()
        assert sorted(r.by_another for r in results) == [False, True], results
        builder = next(r for r in results if not r.by_another)
        assert builder.events > 0
        assert_tables_match(ledger, pg_url, ACCOUNT_BALANCES_V2)


def test_a_long_reconcile_says_how_far_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`daybook reconcile` folded the whole log before it printed anything (the README's
    benchmark: 120 s for a million rows). A fold that lasts says how far it is, on stderr
    every few seconds, as `projections rebuild` and `requests purge` do. (A log of many
    fold batches in miniature, on a clock that moves 3 s a look.)"""
    from daybook.infrastructure.cli import main
    from daybook.infrastructure.readmodels import cli as readmodels_cli
    from daybook.infrastructure.readmodels import reconcile as reconcile_module

    url = f"sqlite:///{tmp_path}/daybook.db"
    with open_ledger(url) as ledger:
        workload(ledger, 300)
        head = ledger.head()
        with run_projections(ledger, url, start=False) as runner:
            runner.run_until_caught_up()
    monkeypatch.setattr(reconcile_module, "FOLD_BATCH", 20)
    now = [0.0]

    def clock() -> float:
        now[0] += 3.0
        return now[0]

    monkeypatch.setattr(readmodels_cli._Said, "clock", staticmethod(clock))
    capsys.readouterr()
    assert main(["reconcile", "account_statement", "--url", url]) == 0
    out, err = capsys.readouterr()
    said = [line for line in err.splitlines() if "folded the log to position" in line]
    assert len(said) > 3, (out, err)
    assert said[-1].startswith("account_statement v"), said
    assert f"of {head:,}" in said[-1], said
    assert "clean" in out
