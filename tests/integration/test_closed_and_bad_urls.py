"""What an embedding service's mistakes meet: a ledger used after ``close``, and a read-model
URL no store takes."""

from __future__ import annotations

from pathlib import Path

import pytest

import daybook
from daybook import open_ledger, run_projections


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_closed_ledger_refuses_commands_and_reads_with_a_stable_code(
    kind: str, tmp_path: Path
) -> None:
    """The brief's promise: every error a caller's mistake meets has a stable ``code`` and a
    clear message. Using a ledger after ``close`` is such a mistake (a request handler that
    outlives the service's shutdown)."""
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/closed.db"
    ledger = open_ledger(url)
    account = ledger.open_account("a", "EUR").account_id
    ledger.close()
    for call in (
        lambda: ledger.deposit(account, 1),
        lambda: ledger.account(account),
        lambda: ledger.head(),
    ):
        try:
            call()
        except Exception as error:
            assert isinstance(getattr(error, "code", None), str), (
                f"{type(error).__module__}.{type(error).__name__} has no code: {error!r}"
            )
            assert str(error), f"{type(error).__name__} has no message"
            assert type(error).__name__ in daybook.__all__, (
                f"{type(error).__name__} cannot be caught by importing it from daybook"
            )


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
