"""A rebuild beside the version serving reads: a new version that stops while being built
does not fail the server's health (reads go on from the old one), and its progress off a
terminal is lines, not one line redrawn for hours."""

from __future__ import annotations

import io
from typing import Any

import pytest

from daybook import open_ledger, run_projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.readmodels.catalog import VersionState
from daybook.infrastructure.readmodels.rebuild import rebuild
from tests.projections.helpers import version_record, workload
from tests.projections.test_rebuild_reconcile import ACCOUNT_BALANCES_V2


@pytest.mark.postgres
def test_a_new_version_that_parks_while_being_built_does_not_fail_the_servers_health(
    pg_url: str,
) -> None:
    """New code deployed with a version 2 whose handler raises on one event: the server's
    runner builds v2 beside v1 (which keeps serving every read), and v2 parks and stops
    without switching. Reads, writes and v1 are fine; /health said 503 (a load balancer
    took every new-code server out at once, an orchestrator restarted them all, for a
    version that serves nothing). It says so in status and the log only."""
    import dataclasses
    import time

    from daybook import projections
    from daybook.infrastructure.bootstrap import http_parts
    from daybook.infrastructure.http.tokens import open_tokens
    from daybook.infrastructure.settings import Settings
    from daybook.projections.accounts import DEPOSITED
    from daybook.projections.model import LogEvent, Rows
    from tests.http.conftest import Api

    with open_ledger(pg_url) as ledger:
        ids = workload(ledger, 50)
        ledger.deposit(ids[0], 13)
        with run_projections(ledger, pg_url, poll_interval=0.01) as v1:
            v1.views.balance(ids[0], min_position=ledger.head(), timeout=30)
    good = ACCOUNT_BALANCES_V2.handlers[DEPOSITED]

    def deposit(event: LogEvent, rows: Rows) -> None:
        if event.data["amount"] == 13:
            raise ValueError("cannot apply a deposit of 13")
        good(event, rows)

    poisoned = dataclasses.replace(
        ACCOUNT_BALANCES_V2, handlers={**ACCOUNT_BALANCES_V2.handlers, DEPOSITED: deposit}
    )
    code = [poisoned if p.name == "account_balances" else p for p in projections.ALL]
    parts = http_parts(Settings.load(url=pg_url), projections=code, tokens=open_tokens(pg_url))
    api = Api(parts)
    api.token("tester", "read", "write", "admin")
    try:
        deadline = time.monotonic() + 60
        while True:
            record = version_record(pg_url, "account_balances", 2)
            if record is not None and record.state is VersionState.STOPPED:
                break
            assert time.monotonic() < deadline, record
            time.sleep(0.05)
        read = api.get(f"/v1/accounts/{ids[0]}/balance")
        assert read.status_code == 200, read.text  # v1 serves
        reply = api.run(api.client.get("/health", headers=api.auth("tester")))
        assert reply.status_code == 200, reply.text
    finally:
        api.close()


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
