"""The saga state machine, on the aggregate alone (no store, no ledger, no processor)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

import pytest

from daybook.domain.accounts import Deposit
from daybook.domain.commands import Command
from daybook.domain.errors import DomainError
from daybook.domain.events import Metadata, metadata_scope
from daybook.domain.orders import ORDER, order_saga_id
from daybook.domain.sagas import (
    MAX_STEP_NAME,
    Compensate,
    DecisionMetadata,
    FireDeadline,
    Local,
    Remote,
    RunStep,
    Saga,
    SagaContext,
    SagaDefinition,
    SagaPolicy,
    SagaState,
    Step,
    Wait,
)
from daybook.domain.values import check_request_text
from daybook.infrastructure.sagas.processor import _undo_id, idempotency_key

T0 = datetime(2030, 1, 1, tzinfo=UTC)
ACCOUNT = "6f0a3c3e-7d1b-4f0e-8a51-2b1c9d7e0f11"


def _local(context: SagaContext) -> Command:
    return Deposit(ACCOUNT, 1)


def _remote(context: SagaContext) -> dict[str, Any]:
    return {}


TRIP = SagaDefinition(
    "test-trip",
    steps=(
        Step("flight", Local(_local), Local(_local)),
        Step("note", Local(_local)),  # nothing to undo
        Step(
            "pay",
            Remote("payments", "charge", _remote),
            Remote("payments", "refund", _remote),
            deadline=60,
        ),
        Step("confirm", Local(_local)),
    ),
    policy=SagaPolicy(max_attempts=3, max_compensation_attempts=2),
)


def started(now: datetime = T0) -> Saga:
    saga = Saga._create(Saga.Started, id=uuid4(), kind=TRIP.name, data={})
    saga.as_of = now
    saga.enter_step(now)
    return saga


def names(saga: Saga) -> list[str]:
    return [type(event).__name__ for event in saga.collect_events()]


def replayed(saga: Saga, events: list[Any]) -> Saga:
    """The same saga rebuilt from its events (state is a function of the log)."""
    copy: Saga | None = None
    for event in events:
        copy = event.mutate(copy)
    assert copy is not None
    return copy


def test_steps_run_in_order_to_completion() -> None:
    saga = started()
    assert saga.next_move(T0) == RunStep(TRIP.steps[0], 1)
    saga.complete_step("flight", {"seat": "1A"}, T0)
    saga.complete_step("note", {}, T0)
    # Entering "pay" set its deadline, in the same command that completed "note".
    assert names(saga) == ["Started", "StepCompleted", "StepCompleted", "DeadlineSet"]
    assert saga.deadline == ("pay", T0 + timedelta(seconds=60), 1)
    assert saga.next_move(T0) == RunStep(TRIP.steps[2], 1)
    saga.complete_step("pay", {"charge_id": "ch_1"}, T0)
    assert saga.deadline is None
    saga.complete_step("confirm", {}, T0)
    assert names(saga) == ["StepCompleted", "StepCompleted", "Finished"]
    assert saga.state is SagaState.COMPLETED
    assert saga.next_move(T0 + timedelta(days=1)) == Wait(None)
    assert saga.results["flight"] == {"seat": "1A"}


def test_a_failed_attempt_waits_then_tries_again_unless_the_deadline_comes_first() -> None:
    saga = started()
    saga.complete_step("flight", {}, T0)
    saga.complete_step("note", {}, T0)
    saga.attempt_failed("pay", 1, "503", T0 + timedelta(seconds=5))
    assert saga.next_move(T0 + timedelta(seconds=4)) == Wait(T0 + timedelta(seconds=5))
    assert saga.next_move(T0 + timedelta(seconds=5)) == RunStep(TRIP.steps[2], 2)
    saga.attempt_failed("pay", 2, "503", T0 + timedelta(seconds=500))
    assert saga.wake_at == T0 + timedelta(seconds=60)  # the deadline is sooner
    assert saga.next_move(T0 + timedelta(seconds=60)) == FireDeadline("pay", 1)


def test_a_deadline_compensates_and_includes_the_remote_step_itself() -> None:
    saga = started()
    saga.complete_step("flight", {}, T0)
    saga.complete_step("note", {}, T0)
    saga.collect_events()
    with pytest.raises(DomainError) as early:
        saga.fire_deadline("pay", 1, "processor", T0 + timedelta(seconds=59))
    assert early.value.code == "saga_moved_on"
    at = T0 + timedelta(seconds=60)
    with metadata_scope(Metadata(request_id="r-1")):
        saga.fire_deadline("pay", 1, "processor", at)
    (fired,) = saga.collect_events()
    assert isinstance(fired.meta, DecisionMetadata) and fired.meta.decision is not None
    assert (fired.meta.decision.by, fired.meta.decision.at) == ("processor", at)
    assert "deadline" in fired.meta.decision.why and fired.meta.request_id == "r-1"
    assert saga.state is SagaState.COMPENSATING
    # The charge may have happened unheard of: refund it (by key) before the flight.
    assert saga.next_move(at) == Compensate(TRIP.steps[2], 1)
    saga.compensated("pay", {"status": "nothing_to_refund"}, "processor", at)
    assert saga.next_move(at) == Compensate(TRIP.steps[0], 1)
    saga.compensated("flight", {}, "processor", at)
    assert saga.state is SagaState.COMPENSATED
    assert names(saga) == ["Compensated", "Compensated", "Finished"]


def test_a_deadline_that_fires_after_its_step_completed_is_ignored() -> None:
    saga = started()
    saga.complete_step("flight", {}, T0)
    saga.complete_step("note", {}, T0)
    saga.complete_step("pay", {}, T0)
    with pytest.raises(DomainError) as late:
        saga.fire_deadline("pay", 1, "processor", T0 + timedelta(hours=1))
    assert late.value.code == "saga_moved_on"
    assert saga.state is SagaState.RUNNING


def test_a_refused_local_step_compensates_what_ran_in_reverse() -> None:
    saga = started()
    saga.complete_step("flight", {}, T0)
    saga.complete_step("note", {}, T0)
    saga.complete_step("pay", {}, T0)
    saga.fail_step(TRIP.steps[3], "out_of_stock", "none left", "processor", T0)
    assert saga.pending_compensations == ["flight", "pay"]  # "note" has nothing to undo
    assert saga.next_move(T0) == Compensate(TRIP.steps[2], 1)


def test_a_failed_first_step_with_nothing_to_undo_is_compensated_at_once() -> None:
    saga = started()
    saga.fail_step(TRIP.steps[0], "insufficient_funds", "no", "processor", T0)
    assert saga.state is SagaState.COMPENSATED
    assert names(saga)[-2:] == ["StepFailed", "Finished"]


def test_a_compensation_that_keeps_failing_needs_attention_until_retried() -> None:
    saga = started()
    saga.complete_step("flight", {}, T0)
    saga.fail_step(TRIP.steps[1], "refused", "no", "processor", T0)
    saga.compensation_failed("flight", 1, "down", T0 + timedelta(seconds=1), "processor", T0)
    assert saga.state is SagaState.COMPENSATING
    assert saga.next_move(T0) == Wait(T0 + timedelta(seconds=1))
    saga.compensation_failed("flight", 2, "down", T0, "processor", T0)
    assert saga.state is SagaState.NEEDS_ATTENTION
    assert saga.next_move(T0 + timedelta(days=1)) == Wait(None)
    assert saga.last_error == "down"
    saga.retry("alice", "the gateway is back", T0)
    assert saga.next_move(T0) == Compensate(TRIP.steps[0], 1)
    saga.collect_events()
    saga.compensated("flight", {}, "processor", T0)
    assert saga.state is SagaState.COMPENSATED


def test_a_saga_that_needs_attention_shows_the_step_whose_compensation_stopped() -> None:
    """The dashboard and ``sagas show`` say which step a person must look at: the one whose
    compensation stopped, not the forward step the saga had failed at before."""
    saga = started()
    saga.complete_step("flight", {}, T0)
    saga.fail_step(TRIP.steps[1], "refused", "no", "processor", T0)
    saga.compensation_failed("flight", 8, "down", T0, "processor", T0)
    assert saga.state is SagaState.NEEDS_ATTENTION
    assert saga.view().step == "flight"


def test_a_retry_acknowledges_a_step_that_cannot_be_undone_and_compensates_the_rest() -> None:
    """Retrying a step whose work went the other way would meet the same refusal for ever:
    the person's retry records it as acknowledged, and the compensations behind it run. The
    state says so after a replay too; a failing compensation's retry still tries again."""
    saga = started()
    saga.complete_step("flight", {}, T0)
    saga.complete_step("note", {}, T0)
    saga.cancel("bob", "customer called", T0)
    saga.compensated("pay", {}, "processor", T0)
    saga.compensation_failed("flight", 1, "down", T0, "processor", T0)
    saga.cannot_undo("flight", "flight was flown", "processor", T0)
    assert (saga.state, saga.kept) == (SagaState.NEEDS_ATTENTION, "flight")
    events = list(saga.collect_events())
    assert replayed(saga, events).kept == "flight"
    saga.retry("ops", "refunded by hand", T0)
    acknowledged = [e for e in saga.collect_events() if isinstance(e, Saga.Compensated)]
    assert [(e.step, e.result) for e in acknowledged] == [
        ("flight", {"kept": "flight was flown", "acknowledged_by": "ops"})
    ]
    assert (saga.state, saga.kept) == (SagaState.COMPENSATED, None)

    failing = started()
    failing.complete_step("flight", {}, T0)
    failing.fail_step(TRIP.steps[1], "refused", "no", "processor", T0)
    failing.compensation_failed("flight", 8, "down", T0, "processor", T0)
    assert failing.kept is None
    failing.retry("ops", "gateway back", T0)
    assert failing.next_move(T0) == Compensate(TRIP.steps[0], 1)


def test_a_version_1_needs_attention_reads_as_not_kept() -> None:
    state: dict[str, Any] = {"step": "flight", "error": "down"}
    Saga.NeedsAttention.upcast_v1_v2(state)
    assert state["kept"] is False


def test_cancel_compensates_a_running_saga_and_nothing_else() -> None:
    saga = started()
    saga.complete_step("flight", {}, T0)
    saga.complete_step("note", {}, T0)
    saga.cancel("bob", "customer called", T0)
    assert saga.state is SagaState.COMPENSATING
    assert saga.pending_compensations == ["flight", "pay"]
    with pytest.raises(DomainError) as again:
        saga.cancel("bob", "twice", T0)
    assert again.value.code == "saga_moved_on"
    saga.compensated("pay", {}, "p", T0)
    saga.compensated("flight", {}, "p", T0)
    with pytest.raises(DomainError) as finished:
        saga.cancel("bob", "too late", T0)
    assert finished.value.code == "saga_finished"
    # A retry of a finished saga is refused as finished too (it said saga_moved_on).
    with pytest.raises(DomainError) as retried:
        saga.retry("bob", "too late", T0)
    assert retried.value.code == "saga_finished"


def test_every_decision_keeps_who_asked_and_the_trace_of_the_command_that_made_it() -> None:
    """A decision's metadata adds who decided, why and when to the command's metadata: it
    must not drop the rest (the actor, the HTTP token that sent a cancel; the traceparent)."""
    asked = Metadata(
        request_id="r-1",
        correlation_id="c-1",
        causation_id="e-1",
        actor="token-of-mallory",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    failing, cancelled, late = started(), started(), started()
    for saga in (failing, cancelled, late):
        saga.complete_step("flight", {}, T0)
        saga.collect_events()
    late.complete_step("note", {}, T0)
    late.collect_events()
    with metadata_scope(asked):
        failing.fail_step(TRIP.steps[1], "refused", "no", "processor", T0)
        failing.compensation_failed("flight", 1, "down", T0, "processor", T0)
        failing.compensation_failed("flight", 2, "down", T0, "processor", T0)
        failing.retry("alice", "the gateway is back", T0)
        failing.compensated("flight", {}, "processor", T0)
        cancelled.cancel("bob", "customer called", T0)
        late.fire_deadline("pay", 1, "processor", T0 + timedelta(seconds=60))
    events = failing.collect_events() + cancelled.collect_events() + late.collect_events()
    decisions = {type(e).__name__: e.meta for e in events if isinstance(e.meta, DecisionMetadata)}
    assert sorted(decisions) == [
        "Cancelled",
        "Compensated",
        "DeadlineFired",
        "NeedsAttention",
        "Retried",
        "StepFailed",
    ]
    for name, meta in decisions.items():
        assert meta.decision is not None, name
        assert Metadata(**meta.model_dump(exclude={"decision"})) == asked, name


def test_outcomes_for_another_step_or_attempt_are_refused() -> None:
    saga = started()
    for check in (
        lambda: saga.check_at_step("pay"),
        lambda: saga.check_at_step("flight", attempt=2),
        lambda: saga.check_compensating("flight", 1),
    ):
        with pytest.raises(DomainError) as caught:
            check()
        assert caught.value.code == "saga_moved_on"
    assert saga.check_at_step("flight", attempt=1).name == "flight"


def test_state_is_rebuilt_from_the_events() -> None:
    saga = started()
    events = list(saga.collect_events())
    saga.complete_step("flight", {"x": 1}, T0)
    saga.complete_step("note", {}, T0)
    saga.attempt_failed("pay", 1, "503", T0)
    saga.fire_deadline("pay", 1, "p", T0 + timedelta(minutes=1))
    events += saga.collect_events()
    copy = replayed(saga, events)
    for name in ("state", "current", "results", "pending_compensations", "attempts", "deadline"):
        assert getattr(copy, name) == getattr(saga, name), name


def test_the_order_plan_has_a_step_per_line_and_a_payment_deadline() -> None:
    data = {"lines": [{"sku": "A"}, {"sku": "B"}], "payment_deadline": 30}
    steps = ORDER.steps_for(data)
    assert [s.name for s in steps] == ["reserve-0", "reserve-1", "hold", "charge", "fulfil"]
    assert steps[3].deadline == 30 and isinstance(steps[3].action, Remote)
    assert steps[4].compensation is None
    assert order_saga_id("o-1") == order_saga_id("o-1") != order_saga_id("o-2")


def test_a_step_name_too_long_for_its_request_ids_is_refused_where_the_saga_is_defined() -> None:
    """A step's name goes into its moves' request ids (at most 200 characters): a name of
    140 characters defined fine, then left its saga stuck at the first move whose id was
    too long (a compensation after a person's retry, say). Names are bounded where they are
    defined; the longest ids of the longest name fit."""
    with pytest.raises(
        ValueError, match=r"1-100 printable characters, got 'xxx.*\(101 characters\)"
    ):
        Step("x" * 101, Local(_nothing))
    with pytest.raises(ValueError, match="printable"):
        Step("charge\n", Local(_nothing))
    longest = Step("s" * MAX_STEP_NAME, Local(_nothing)).name
    saga = SimpleNamespace(id=uuid4(), retries=10**9)
    for request_id in (
        _undo_id(saga, longest, f"retry:{10**6}"),  # type: ignore[arg-type]
        _undo_id(saga, longest, f"done:{10**6}"),  # type: ignore[arg-type]
        f"saga:{saga.id}:{longest}:failed",
        idempotency_key(saga.id, longest),
    ):
        assert check_request_text(request_id, "request_id") == request_id


def _nothing(context: SagaContext) -> Command:
    raise AssertionError("never built")
