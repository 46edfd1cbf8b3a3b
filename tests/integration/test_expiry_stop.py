"""Stopping the expiry sweeper while it records a backlog of expiries."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from types import SimpleNamespace
from uuid import uuid4

import pytest

from daybook import open_ledger
from daybook.infrastructure.expiry import ExpirySweeper
from daybook.infrastructure.lifecycle import ServiceState


def _now() -> datetime:
    return datetime.now(UTC)


class Backlog:
    """The open_holds read model with a full page of holds due."""

    def __init__(self, batch: int) -> None:
        self.page = [{"hold_id": str(uuid4())} for _ in range(batch)]

    def rows(self, projection: object, table: str, **kwargs: object) -> object:
        return SimpleNamespace(value=list(self.page) if table == "open_holds" else [])

    def count(self, *args: object, **kwargs: object) -> object:
        return SimpleNamespace(value={})


def test_a_stop_ends_a_sweep_after_the_expiry_in_hand() -> None:
    """``stop()`` asks the sweeper to finish what it has in hand; a sweep of a backlog
    (up to 500 holds and 500 reservations, each one command waiting for its commit) went
    on to the end of its page first: on a slow database, longer than the stop's 30 s."""
    sent: list[object] = []
    stopped = threading.Event()

    class StoppedAfterTheFirst:
        def execute(self, command: object) -> None:
            sent.append(command)
            if len(sent) == 1:
                sweeper.service.stopping.set()  # what stop() does first
                stopped.set()

    ledger = StoppedAfterTheFirst()
    sweeper = ExpirySweeper(ledger, Backlog(500), interval=3600.0, clock=_now)  # type: ignore[arg-type]
    sweeper.start()
    assert stopped.wait(30)
    sweeper.service.join(30)
    assert len(sent) == 1, f"{len(sent)} expiries recorded after the stop was asked"


def test_a_ledger_closed_under_a_sweep_that_outlived_its_stop_is_no_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``daybook serve`` (and ``sagas run``) close the ledger once ``sweeper.stop`` returns,
    also when it gave up waiting: the sweep in hand then met ``LedgerClosed``, which the
    sweeper logged as a failure, with its traceback, on a clean stop."""
    caplog.set_level(logging.INFO, logger="daybook.services")
    ledger = open_ledger("memory://")
    gate, called = threading.Event(), threading.Event()

    class SlowLedger:
        def execute(self, command: object) -> None:
            if not called.is_set():
                called.set()
                gate.wait(30)  # a slow commit, past the stop's timeout
            ledger.execute(command)

    sweeper = ExpirySweeper(SlowLedger(), Backlog(5), interval=3600.0, clock=_now)  # type: ignore[arg-type]
    sweeper.start()
    assert called.wait(30)
    sweeper.stop(timeout=0.2)  # gives up waiting
    ledger.close()
    gate.set()
    sweeper.service.join(30)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert sweeper.health().state is not ServiceState.FAILED, sweeper.health()
