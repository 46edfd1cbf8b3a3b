"""A person's retry of a saga that needs attention runs its compensation again, with the
policy's backoff and limit, as the first round did (each round has request ids of its own:
reusing the first round's replayed its outcomes, so the retry changed nothing)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from daybook import open_ledger
from daybook.domain.accounts import Deposit, Withdraw
from daybook.domain.commands import Aggregates, Command, Text, Uuid
from daybook.domain.errors import DomainError
from daybook.domain.sagas import (
    CancelSaga,
    Local,
    RetryLater,
    RetrySaga,
    RunLocalCompensation,
    Saga,
    SagaContext,
    SagaDefinition,
    SagaPolicy,
    SagaState,
    Step,
    Wait,
)
from daybook.infrastructure.gateway import Refund
from daybook.infrastructure.sagas.processor import SagaProcessor, _undo_id
from tests.integration.test_sagas import Shop, shop  # noqa: F401  (a fixture)


def _credit(context: SagaContext) -> Command:
    return Deposit(context.data["account"], 100)


def _debit_back(context: SagaContext) -> Command:
    return Withdraw(context.data["account"], 100)


def _too_much(context: SagaContext) -> Command:
    return Withdraw(context.data["account"], 10**12)


#: Credits an account, then fails: its compensation takes the credit back.
CREDIT_THEN_FAIL = SagaDefinition(
    "credit-then-fail",
    steps=(Step("credit", Local(_credit), Local(_debit_back)), Step("boom", Local(_too_much))),
    policy=SagaPolicy(max_compensation_attempts=2),
)


class StartCreditThenFail(Command):
    saga_id: Uuid
    account: Uuid
    #: The definition: CREDIT_THEN_FAIL, or one of its steps with another policy.
    kind: Text = CREDIT_THEN_FAIL.name

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        data = {"account": str(self.account)}
        saga = aggregates.add(
            Saga._create(Saga.Started, id=self.saga_id, kind=self.kind, data=data)
        )
        assert aggregates.now is not None
        saga.enter_step(aggregates.now)
        return {"saga_id": self.saga_id}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def settle(processor: SagaProcessor, clock: Clock, saga_id: UUID) -> Saga:
    """Drive the saga until it stops moving, moving time to each wake-up."""
    for _ in range(20):
        saga = processor.drive(saga_id)
        move = saga.next_move(clock.now)
        if saga.state not in (SagaState.RUNNING, SagaState.COMPENSATING):
            return saga
        if isinstance(move, Wait) and move.until is not None:
            clock.now = move.until + timedelta(milliseconds=1)
    return processor.ledger.read(Saga, saga_id)


def test_a_processor_clock_without_a_time_zone_writes_nothing_others_cannot_judge() -> None:
    """A naive retry time in the log made every process with a correct clock fail to judge
    the saga (naive and aware times do not compare), for good: the processor's own clock is
    held to the ledger's rule, and the command refuses a naive time from anyone."""
    with open_ledger("memory://") as ledger:
        account = ledger.open_account("shop", "EUR").account_id
        saga_id = uuid4()
        ledger.execute(StartCreditThenFail(saga_id, account))
        good = SagaProcessor(ledger, None, {}, seed=1)  # type: ignore[arg-type]
        good.drive(saga_id, max_moves=1)  # "credit": 100 deposited
        ledger.withdraw(account, 100)  # spent, so "boom" then taking it back fail
        with pytest.raises(TypeError, match="aware"):
            SagaProcessor(ledger, None, {}, clock=datetime.now, seed=1)  # type: ignore[arg-type]
        head = ledger.head()
        with pytest.raises(DomainError) as refused:
            ledger.execute(RetryLater(saga_id, "boom", 1, "down", datetime(2030, 1, 1)))
        assert refused.value.code == "invalid_request", refused.value
        assert "time zone" in str(refused.value)
        assert ledger.head() == head
        ledger.read(Saga, saga_id).next_move(datetime.now(UTC))
        good.stop()


def test_a_retry_runs_a_refused_local_compensation_again() -> None:
    clock = Clock()
    with open_ledger("memory://", clock=clock) as ledger:
        account = ledger.open_account("shop", "EUR").account_id
        processor = SagaProcessor(ledger, None, {}, clock=clock, seed=1)  # type: ignore[arg-type]
        try:
            saga_id = uuid4()
            ledger.execute(StartCreditThenFail(saga_id, account))
            processor.drive(saga_id, max_moves=1)  # "credit": 100 deposited
            ledger.withdraw(account, 100)  # and spent, so taking it back is refused
            saga = settle(processor, clock, saga_id)
            assert saga.state is SagaState.NEEDS_ATTENTION, saga.state
            ledger.deposit(account, 100)  # a person puts the money back...
            ledger.execute(RetrySaga(saga_id, "alice", "funds restored"))  # ...and retries
            saga = settle(processor, clock, saga_id)
            assert saga.state is SagaState.COMPENSATED, (saga.state, saga.last_error)
            assert ledger.account(account).balance == 0
        finally:
            processor.stop()


def test_a_compensation_refused_for_a_processor_of_another_name_is_tried_again() -> None:
    """A processor sent a compensation's first attempt, which was refused (the credit was
    spent), and stopped before recording the attempt failed. Another processor, of another
    name, took the saga up and sent the same attempt: as its name is in the command, it was
    answered idempotency_conflict, which it took for another delivery's progress, sent it
    again (1,000 times a drive), and the saga never moved for the request retention window.
    The attempt is now recorded failed, and the next one runs."""
    clock = Clock()
    with open_ledger("memory://", clock=clock) as ledger:
        account = ledger.open_account("shop", "EUR").account_id
        processor = SagaProcessor(ledger, None, {}, clock=clock, seed=1, name="second")  # type: ignore[arg-type]
        try:
            saga_id = uuid4()
            ledger.execute(StartCreditThenFail(saga_id, account))
            processor.drive(saga_id, max_moves=1)  # "credit": 100 deposited
            ledger.withdraw(account, 100)  # and spent, so taking it back is refused
            saga = processor.drive(saga_id, max_moves=1)  # "boom" fails: compensate
            assert saga.state is SagaState.COMPENSATING and saga.attempts == 0
            with pytest.raises(DomainError) as refused:  # the first processor, which stops
                ledger.execute(
                    RunLocalCompensation(
                        saga_id,
                        "credit",
                        1,
                        decided_by="first",
                        request_id=_undo_id(saga, "credit", "1"),
                        correlation_id=str(saga_id),
                    )
                )
            assert refused.value.code == "insufficient_funds", refused.value
            ledger.deposit(account, 100)  # the money is back
            moves = processor.moves
            saga = processor.drive(saga_id)
            assert processor.moves - moves == 1 and saga.attempts == 1, saga.view()
            assert saga.last_error is not None and "insufficient_funds" in saga.last_error
            saga = settle(processor, clock, saga_id)
            assert saga.state is SagaState.COMPENSATED, saga.view()
            assert ledger.account(account).balance == 0
        finally:
            processor.stop()


def test_a_retried_remote_compensation_that_fails_again_needs_attention_again(
    shop: Shop,  # noqa: F811
) -> None:
    saga_id = shop.order("o-retry", [("KETTLE", 1, 3_000)])
    shop.processor.drive(saga_id, max_moves=3)  # reserve, hold, charge
    shop.ledger.execute(CancelSaga(saga_id, "bob", "customer called", request_id="c-1"))
    shop.server.gateway.knobs.refund_unavailable_rate = 1.0
    assert shop.run(saga_id, rounds=200).state is SagaState.NEEDS_ATTENTION
    port = shop.processor.ports["payments"]
    calls: list[str] = []
    refund = port.refund

    def counted(key: str) -> Refund:
        calls.append(key)
        return refund(key)

    port.refund = counted  # type: ignore[method-assign]
    # A person retries while the gateway still fails refunds: the policy's attempts, with
    # their backoff, take the saga back to needs attention.
    shop.ledger.execute(RetrySaga(saga_id, "alice", "try again"))
    saga = shop.run(saga_id, rounds=200)
    assert saga.state is SagaState.NEEDS_ATTENTION
    limit = saga.definition.policy.max_compensation_attempts
    assert len(calls) == limit and saga.attempts == limit - 1
    # And once the gateway is back, a second retry compensates.
    shop.server.gateway.knobs.refund_unavailable_rate = 0.0
    shop.ledger.execute(RetrySaga(saga_id, "alice", "gateway back"))
    assert shop.run(saga_id).state is SagaState.COMPENSATED


#: As CREDIT_THEN_FAIL, with a policy that keeps compensating for a long outage (attempts a
#: deployment may well allow: at the 5 s backoff ceiling, 1,100 is about 45 minutes).
PATIENT = SagaDefinition(
    "credit-then-fail-patiently",
    steps=CREDIT_THEN_FAIL.steps,
    policy=SagaPolicy(max_compensation_attempts=1_100),
)


def test_a_policy_of_more_than_a_thousand_attempts_keeps_retrying() -> None:
    """The backoff before attempt n is initial * 2**(n-1), capped at the ceiling: computed
    uncapped, past attempt 1,024 the power no longer converts to a float, and the
    processor failed (for good: every restart met the same attempt) instead of retrying
    until the policy's limit."""
    clock = Clock()
    with open_ledger("memory://", clock=clock) as ledger:
        account = ledger.open_account("shop", "EUR").account_id
        processor = SagaProcessor(ledger, None, {}, clock=clock, seed=1)  # type: ignore[arg-type]
        try:
            saga_id = uuid4()
            ledger.execute(StartCreditThenFail(saga_id, account, kind=PATIENT.name))
            processor.drive(saga_id, max_moves=1)  # "credit": 100 deposited
            ledger.withdraw(account, 100)  # and spent: taking it back is refused each time
            for _ in range(1_200):
                saga = processor.drive(saga_id)
                move = saga.next_move(clock.now)
                if saga.state is not SagaState.COMPENSATING or not isinstance(move, Wait):
                    break
                assert move.until is not None
                clock.now = move.until + timedelta(milliseconds=1)
            assert saga.state is SagaState.NEEDS_ATTENTION, saga.view()
            assert saga.attempts == 1_099
        finally:
            processor.stop()
