"""A rebuild beside the version serving reads: its progress off a terminal is lines, not one
line redrawn for hours; one given up on is retired and dropped with ``--abandon``."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import pytest

from daybook import open_ledger, run_projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.readmodels.catalog import VersionState
from daybook.infrastructure.readmodels.rebuild import rebuild
from daybook.projections.accounts import DEPOSITED
from daybook.projections.model import LogEvent, Rows
from scripts.streams import wait_until
from tests.projections.helpers import version_record, workload
from tests.projections.test_rebuild_reconcile import ACCOUNT_BALANCES_V2


def _deposit_but_13(event: LogEvent, rows: Rows) -> None:
    if event.data["amount"] == 13:
        raise ValueError("cannot apply a deposit of 13")
    ACCOUNT_BALANCES_V2.handlers[DEPOSITED](event, rows)


#: account_balances v2 as first written: it cannot apply a deposit of 13.
POISONED_V2 = dataclasses.replace(
    ACCOUNT_BALANCES_V2, handlers={**ACCOUNT_BALANCES_V2.handlers, DEPOSITED: _deposit_but_13}
)


def served_by_v1_with_a_deposit_of_13(url: str) -> list[Any]:
    """A log with a deposit of 13 among others, account_balances v1 serving it all: ids."""
    with open_ledger(url) as ledger:
        ids = workload(ledger, 50)
        ledger.deposit(ids[0], 13)
        with run_projections(ledger, url, poll_interval=0.01) as v1:
            v1.views.balance(ids[0], min_position=ledger.head(), timeout=30)
    return ids


def test_a_rebuilds_progress_to_a_file_or_pipe_is_lines(tmp_path: Any) -> None:
    """Run as a job (stderr to a file, journald, a container's log), a rebuild's progress is
    one line that never ends until the rebuild does: each redraw starts with a carriage
    return, up to ten a second for hours; log collectors split or drop such a line, and
    nothing a person can tail showed how far it was. Off a terminal it prints lines (as
    ``reconcile`` does, every few seconds)."""
    url = f"sqlite:///{tmp_path}/daybook.db"
    with open_ledger(url) as ledger:
        workload(ledger, 300)
        with run_projections(ledger, url, poll_interval=0.01) as live:
            live.views.balance(
                ledger.open_account("x", "EUR").account_id, min_position=ledger.head(), timeout=30
            )
        out = io.StringIO()  # not a terminal
        rebuild(event_log_of(ledger), url, ACCOUNT_BALANCES_V2, batch_size=20, stream=out)
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n"), repr(text[:300])


@pytest.mark.postgres
def test_a_rebuild_given_up_on_is_retired_and_dropped_with_abandon(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """v2's rebuild stopped on an event its code cannot apply, and the team went back to the
    code of v1 rather than fix v2: v2 stayed stopped, its tables as large as the projection,
    and ``projections drop`` refused it (not retired) with nothing else to remove it. With
    ``--abandon`` it is retired and dropped; the version serving is refused."""
    import psycopg

    from daybook.infrastructure.cli import main
    from daybook.infrastructure.readmodels.rebuild import RebuildError

    served_by_v1_with_a_deposit_of_13(pg_url)
    with open_ledger(pg_url) as ledger, pytest.raises(RebuildError):
        rebuild(event_log_of(ledger), pg_url, POISONED_V2, batch_size=20, stream=io.StringIO())
    stopped = version_record(pg_url, "account_balances", 2)
    assert stopped is not None and stopped.state is VersionState.STOPPED
    tables = json_tables(pg_url, "account_balances", 2)
    assert tables and all(exists(pg_url, table) for table in tables)
    capsys.readouterr()
    drop = ["projections", "drop", "account_balances", "2", "--url", pg_url]
    assert main(drop) == 1
    assert "--abandon" in capsys.readouterr().err
    assert main(["projections", "drop", "account_balances", "1", "--url", pg_url, "--abandon"]) == 1
    assert "serves reads" in capsys.readouterr().err
    assert main([*drop, "--abandon"]) == 0
    assert all(not exists(pg_url, table) for table in tables)
    retired = version_record(pg_url, "account_balances", 2)
    assert retired is not None and retired.state is VersionState.RETIRED
    serving = version_record(pg_url, "account_balances", 1)
    assert serving is not None and serving.state is VersionState.LIVE
    with psycopg.connect(pg_url) as conn:
        (active,) = conn.execute(
            "SELECT active_version FROM daybook_read_models WHERE name = 'account_balances'"
        ).fetchone()  # type: ignore[misc]
    assert active == 1


def json_tables(url: str, name: str, version: int) -> list[str]:
    import json

    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT tables FROM daybook_projection_versions WHERE name = %s AND version = %s",
            (name, version),
        ).fetchone()
    assert row is not None
    return list(json.loads(row[0]))


def exists(url: str, table: str) -> bool:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
    return row is not None and row[0] is not None


def test_a_progress_bar_on_a_closed_stream_is_no_terminal_and_raises_nothing() -> None:
    """Asking a stream whether it is a terminal raised on a closed one: ``rebuild``'s default
    stream was ``sys.stderr`` as it was at import (under pytest, closed by then), so every
    rebuild raised ``ValueError`` before its first batch, progress shown or not."""
    from daybook.infrastructure.readmodels.rebuild import ProgressBar

    closed = io.StringIO()
    closed.close()
    assert not ProgressBar("account_balances v2", 0, closed).terminal


@pytest.mark.postgres
def test_a_stopped_new_version_fails_health_only_while_nobody_follows_the_one_serving(
    pg_url: str,
) -> None:
    """New code's v2 stops while being built beside v1. While a runner of the old code (a
    rolling deploy under way) still follows v1, reads go on from it: failing the new
    servers' health would take every one of them out at once, for a version serving
    nothing. Once no runner follows v1, its answers fall behind: health fails."""
    from daybook.infrastructure.lifecycle import ServiceState
    from daybook.infrastructure.readmodels.runner import ProjectionRunner
    from daybook.projections.accounts import ACCOUNT_BALANCES

    served_by_v1_with_a_deposit_of_13(pg_url)
    with open_ledger(pg_url) as ledger:
        log = event_log_of(ledger)
        old = ProjectionRunner(log, pg_url, [ACCOUNT_BALANCES])
        new = ProjectionRunner(log, pg_url, [POISONED_V2], retry_backoff=0.001)
        try:
            old.step()  # the old code's runner follows v1 (holds its writer lock)
            wait_until(
                lambda: (
                    new.step() == 0
                    and getattr(version_record(pg_url, "account_balances", 2), "state", None)
                    is VersionState.STOPPED
                ),
                "v2 to stop on the deposit of 13",
            )
            new.step()
            assert new.versions_health().state is ServiceState.RUNNING, new.versions_health()
            old.stop()  # the last server of the old code goes (its session ends soon after)
            wait_until(
                lambda: new.step() == 0 and not new.versions_health().ok,
                "the new runner's health to fail once nobody follows v1",
            )
            assert "v2" in (new.versions_health().error or "")
        finally:
            old.stop()
            new.stop()
