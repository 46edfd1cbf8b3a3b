"""Restores: an event store put back from a backup older than its read models."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from daybook import open_ledger, run_projections
from daybook import projections as definitions
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionState
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.status import projection_status


def _restored(tmp_path: Path) -> tuple[str, str, str]:
    """A log of an account and 6 deposits whose read models reached position 7, then the
    event store put back from a backup taken at position 2: (events url, read models url,
    the account)."""
    events = tmp_path / "events.db"
    backup = tmp_path / "backup.db"
    readmodels = f"sqlite:///{tmp_path}/readmodels.db"
    with open_ledger(f"sqlite:///{events}") as ledger:
        account = ledger.open_account("ann", "EUR").account_id
        assert account is not None
        ledger.deposit(account, 100)
    shutil.copyfile(events, backup)  # the nightly backup
    with open_ledger(f"sqlite:///{events}") as ledger:
        for _ in range(5):
            ledger.deposit(account, 10)  # lost with the disk
        with run_projections(ledger, readmodels, poll_interval=0.01) as runner:
            row = runner.views.balance(account, min_position=ledger.head(), timeout=30)
            assert row is not None and row.balance == 150
    for suffix in ("-wal", "-shm"):
        Path(f"{events}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(backup, events)  # the restore
    return f"sqlite:///{events}", readmodels, str(account)


def test_a_runner_and_status_say_so_when_the_read_models_are_past_a_restored_log(
    tmp_path: Path,
) -> None:
    """The read models' position is past the head of a restored log: the next events take
    positions they believe they applied. The runner said "caught up at log position 7"
    with the head at 3 and skipped them; status said lag 0 and exited 0."""
    events, readmodels, account = _restored(tmp_path)
    with open_ledger(events) as ledger:
        ledger.deposit(account, 1000)
        (before,) = [
            s for s in projection_status(event_log_of(ledger), readmodels)
            if s.name == "account_balances"
        ]  # fmt: skip
        assert before.note and "past the event log's head" in before.note, before
        with run_projections(ledger, readmodels, poll_interval=0.01) as runner:
            runner.run_until_caught_up()
            health = runner.versions_health()
        (after,) = [
            s for s in projection_status(event_log_of(ledger), readmodels)
            if s.name == "account_balances"
        ]  # fmt: skip
    assert health.state is not ServiceState.RUNNING, health
    assert after.state is VersionState.STOPPED, after
    assert after.error and "past the event log's head 3" in after.error, after


def test_a_version_handed_over_mid_round_is_not_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a restore: runner A holds account_statement; runner B (both projections) claims
    account_balances, reading the head. Meanwhile A applies a new event and stops (a
    rolling deploy). B then takes account_statement on: its position is A's, past the head
    B read before, though the log is whole. It was stopped as past a restored log."""
    balances, statement = definitions.ALL[0], definitions.ALL[1]
    readmodels = f"sqlite:///{tmp_path}/rm.db"
    with open_ledger(f"sqlite:///{tmp_path}/events.db") as ledger:
        account = ledger.open_account("ann", "EUR").account_id
        ledger.deposit(account, 100)
        a = run_projections(ledger, readmodels, projections=[statement], start=False)
        a.run_until_caught_up()
        b = run_projections(ledger, readmodels, projections=[balances, statement], start=False)
        real_version = VersionCatalog.version
        armed = [True]

        def version(self: VersionCatalog, name: str, number: int, **kw: object) -> object:
            # B looks at account_statement, after it claimed account_balances.
            claiming = sys._getframe(1).f_code.co_name == "_claim_slots"
            if name == statement.name and claiming and armed and armed.pop():
                ledger.deposit(account, 1)  # the log goes on
                a.run_until_caught_up()  # A applies it
                a.stop()  # and lets its versions go
            return real_version(self, name, number, **kw)

        monkeypatch.setattr(VersionCatalog, "version", version)
        try:
            b.run_until_caught_up()
        finally:
            b.stop()
        monkeypatch.undo()
        store = open_store(readmodels)
        try:
            record = VersionCatalog(store).version(statement.name, statement.version)
        finally:
            store.close()
    assert not armed, "B never looked at account_statement"
    assert record is not None
    assert record.state is not VersionState.STOPPED, record.error
