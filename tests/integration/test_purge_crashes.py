"""SIGKILL ``daybook requests purge`` between two of its batches: the next purge deletes
the rest, a request still in its window is still replayed (not applied twice), and one
past its window is new."""

from __future__ import annotations

import signal
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from daybook import open_ledger
from daybook.infrastructure.settings import Settings
from tests.integration.killed import run_module


def purge(url: str, faults: str | None) -> subprocess.CompletedProcess[str]:
    command = ["requests", "purge", "--url", url, "--batch-size", "3"]
    return run_module("daybook.infrastructure.cli", command, faults)


@pytest.mark.slow
@pytest.mark.postgres
def test_sigkill_between_purge_batches(pg_url: str) -> None:
    # Written four days ago (by the ledger's clock): past the 3-day window now.
    four_days_ago = lambda: datetime.now(UTC) - timedelta(days=4)  # noqa: E731
    with open_ledger(pg_url, clock=four_days_ago) as old:
        account = old.open_account("ann", "EUR", request_id="open").account_id
        assert account is not None
        for n in range(8):
            old.deposit(account, 1, request_id=f"old-{n}")
    # Without a purge service of its own: the command line is what is killed here.
    settings = Settings.load(url=pg_url, request_purge_interval=0)
    with open_ledger(settings=settings) as ledger:
        for n in range(4):
            ledger.deposit(account, 10, request_id=f"new-{n}")
        before = ledger.request_purge.report()
        assert before.caller == 9 and before.kept >= 4

        killed = purge(pg_url, "purge.after_batch:2")
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        between = ledger.request_purge.report()
        assert 0 < between.caller + between.generated < before.caller + before.generated
        assert between.kept == before.kept

        finished = purge(pg_url, None)
        assert finished.returncode == 0, finished.stderr[-2000:]
        after = ledger.request_purge.report()
        assert (after.caller, after.generated, after.kept) == (0, 0, before.kept)

        # Still in its window: replayed, not applied again.
        assert ledger.deposit(account, 10, request_id="new-0").replayed
        assert ledger.account(account).balance == 8 + 40
        # Past its window: a new request.
        assert not ledger.deposit(account, 1, request_id="old-0").replayed
        assert ledger.account(account).balance == 8 + 40 + 1
