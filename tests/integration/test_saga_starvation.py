"""Sagas waiting for an open circuit breaker must not starve sagas that are due for other
reasons (a deadline, a local compensation): the processor's pass reads at most ``batch``
due sagas from the ``sagas`` read model, and the ones it skips because they wait for the
breaker must not fill that batch."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from daybook import Ledger, open_ledger, run_projections
from daybook.domain.sagas import Saga, SagaState
from daybook.infrastructure.sagas.breaker import BreakerState
from daybook.infrastructure.sagas.processor import SagaProcessor
from daybook.projections.sagas import SAGA_LIST
from scripts.streams import wait_until
from tests.integration.test_sagas import Clock, DownGateway, _kettle_order


class Monotonic:
    """A monotonic clock the test moves (the breaker's cooldown, the sagas' waits)."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def processor_on(
    clock: Clock, mono: Monotonic, gateway: Any, **options: Any
) -> Iterator[tuple[Ledger, Any, SagaProcessor]]:
    """A memory ledger, the ``sagas`` read model kept by a runner, and a processor whose
    breaker opens at the first failure and cools down for 2 s (on ``mono``)."""
    with (
        open_ledger("memory://", clock=clock) as ledger,
        run_projections(ledger, projections=[SAGA_LIST], poll_interval=0.01) as runner,
    ):
        processor = SagaProcessor(
            ledger,
            runner.views,
            {"payments": gateway},
            monotonic=mono,
            seed=1,
            breaker_threshold=1,
            breaker_cooldown=2.0,
            **options,
        )
        try:
            yield ledger, runner, processor
        finally:
            processor.stop()


def test_sagas_waiting_for_an_open_breaker_do_not_starve_a_due_deadline() -> None:
    """The gateway is down and orders keep arriving: each new one reaches its charge and
    waits for the open breaker (wake_at "now"). An earlier order, whose first charge failed
    before the breaker opened (wake_at its retry time), passes its payment deadline: it must
    fire, whatever the number of orders waiting for the breaker."""
    clock = Clock()
    mono = Monotonic()
    with processor_on(clock, mono, DownGateway(), batch=3, workers=2) as (
        ledger,
        runner,
        processor,
    ):
        _, late = _kettle_order(ledger, "o-late", payment_deadline=30)
        processor.drive(late)  # reserve, hold, a charge answered 503: the breaker opens
        assert processor.breakers["payments"].state is BreakerState.OPEN
        waiting: list[UUID] = []

        def arrive(number: int) -> None:
            _, saga_id = _kettle_order(ledger, f"o-{number}", payment_deadline=3600)
            processor.drive(saga_id)  # reserve, hold, then waits for the breaker
            waiting.append(saga_id)

        for number in range(3):  # as many as the processor's batch
            arrive(number)
        clock.advance(60)  # o-late's payment deadline has passed
        for number in range(3, 13):  # ten cooldowns, two passes in each
            arrive(number)
            mono.now += 2.5  # the cooldown passed: a trial, and the next poll
            for _ in range(2):
                runner.views.rows(SAGA_LIST, "sagas", min_position=ledger.head(), limit=1)
                processor.run_due()
                wait_until(lambda: not processor._in_flight, "the pass's drives to end")
            if ledger.read(Saga, late).state is not SagaState.RUNNING:
                break
            time.sleep(0.01)
        saga = ledger.read(Saga, late)
        assert saga.state is not SagaState.RUNNING, f"o-late's deadline never fired: {saga.view()}"
        assert "deadline" in (saga.last_error or "")


class SlowGateway(DownGateway):
    """Down, then slow: once ``slow`` is set, a charge waits for ``answer`` (a trial call
    that takes the client's whole timeout)."""

    def __init__(self) -> None:
        self.slow = False
        self.answer = threading.Event()
        self.calls = 0

    def charge(self, key: str, **_: object) -> object:  # type: ignore[override]
        self.calls += 1
        if self.slow:
            self.answer.wait(10)
        return super().charge(key)


def test_sagas_do_not_spin_while_the_breakers_trial_call_is_out() -> None:
    """The breaker's cooldown passed and its one trial call is out to a slow gateway: the
    other sagas waiting for it wait for the trial's answer, rather than being read from the
    ledger and parked again at every poll of the processor."""
    clock = Clock()
    mono = Monotonic()
    gateway = SlowGateway()
    with processor_on(clock, mono, gateway, workers=4) as (ledger, runner, processor):
        try:
            sagas = []
            for number in range(3):
                _, saga_id = _kettle_order(ledger, f"o-{number}", payment_deadline=3600)
                processor.drive(saga_id)  # the first opens the breaker, the others wait
                sagas.append(saga_id)
            clock.advance(1)  # the first one's retry time has passed
            gateway.slow = True
            mono.now += 2.5  # the cooldown passed: the next call is the breaker's trial
            runner.views.rows(SAGA_LIST, "sagas", min_position=ledger.head(), limit=1)
            moves = processor.moves
            for _ in range(20):  # 20 polls while the trial is out
                processor.run_due()
                time.sleep(0.02)
            spun = processor.moves - moves
        finally:
            gateway.answer.set()  # the trial call ends, and the processor can stop
    assert gateway.calls == 2  # the first charge, then the one trial
    assert spun <= 3 + 2, f"{spun} moves in 20 polls while one trial call was out"
