"""A handover that meets a deadlock with a writer runs again from the start; it gives up,
loudly, only after several attempts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from psycopg.errors import DeadlockDetected

from daybook.infrastructure.readmodels import handover as module


def run(tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path / 'views.db'}"
    return module.handover(None, url, [], "runner", topic="t", partitions=1)  # type: ignore[arg-type]


def test_a_deadlocked_handover_runs_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def deadlocks_once(*args: Any) -> list[str]:
        calls.append(args)
        if len(calls) == 1:
            raise DeadlockDetected("deadlock detected")
        return ["handed"]

    monkeypatch.setattr(module, "_handover", deadlocks_once)
    assert run(tmp_path) == ["handed"]
    assert len(calls) == 2


def test_a_wrapped_deadlock_is_recognised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store or eventsourcing may wrap the driver's error: the deadlock is still seen."""
    calls = []

    class Wrapped(Exception):
        pass

    def deadlocks_once(*args: Any) -> list[str]:
        calls.append(args)
        if len(calls) == 1:
            try:
                raise DeadlockDetected("deadlock detected")
            except DeadlockDetected as error:
                raise Wrapped("the store failed") from error
        return ["handed"]

    monkeypatch.setattr(module, "_handover", deadlocks_once)
    assert run(tmp_path) == ["handed"]
    assert len(calls) == 2


def test_a_handover_that_keeps_deadlocking_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def deadlocks(*args: Any) -> list[str]:
        raise DeadlockDetected("deadlock detected")

    monkeypatch.setattr(module, "_handover", deadlocks)
    monkeypatch.setattr(module.time, "sleep", lambda seconds: None)
    with pytest.raises(DeadlockDetected):
        run(tmp_path)
