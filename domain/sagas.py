"""Sagas: multi-step operations that cross a boundary one transaction cannot cover.

A saga definition is a list of steps, each with an action and (perhaps) a compensation. A
*local* step is a ledger command; a *remote* one is a call through a port (a payment
gateway) identified by an idempotency key. A step may carry a deadline: how long the saga may
wait in it before it gives up and compensates.

The saga itself is an event-sourced aggregate, so the log is its audit trail. It is a state
machine:

    running --(every step done)--------------------------------> completed
    running --(a step refused, a deadline, a cancel)-----------> compensating
    compensating --(every compensation done, in reverse)-------> compensated
    compensating --(a compensation failed policy-many times)---> needs_attention
    compensating --(its work was resolved the other way)-------> needs_attention
    needs_attention --(retry, by a person)---------------------> compensating

A person's retry tries a failing compensation again; one whose work was resolved the other
way cannot be undone by trying, so the retry records it compensated as acknowledged (the
person has handled what was done) and the remaining compensations run.

What drives it (the saga processor) lives in infrastructure: it asks ``next_move`` what to do
and records each outcome with one of the commands below. A local step runs *inside* the
command that records it (``RunLocalStep``), so the step and the saga's record of it commit in
one transaction: there is no window between them. Every command that records a step names the
step (and the attempt), so a late or repeated delivery is refused (``saga_moved_on``) rather
than applied twice. Decisions (compensating, giving up, a person's cancel or retry) carry who
decided, why and when in their events' metadata (``DecisionMetadata``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from daybook.domain.commands import Aggregates, Command, Instant, Text, Uuid
from daybook.domain.errors import DomainError, InvalidRequest
from daybook.domain.events import LedgerAggregate, Metadata, current_metadata
from daybook.domain.linked import Staged


class SagaState(enum.StrEnum):
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    NEEDS_ATTENTION = "needs_attention"

    @property
    def finished(self) -> bool:
        return self in (SagaState.COMPLETED, SagaState.COMPENSATED)


#: States in which a saga's current step is a compensation.
UNDOING = frozenset({SagaState.COMPENSATING, SagaState.NEEDS_ATTENTION})


class SagaNotFound(DomainError):
    code = "saga_not_found"


class SagaExists(DomainError):
    code = "saga_exists"


class SagaMovedOn(DomainError):
    """An outcome was recorded for a step or attempt the saga is no longer at (a late or
    repeated delivery): ignored."""

    code = "saga_moved_on"


class SagaFinished(DomainError):
    """The saga has ended (completed or compensated); nothing more can change it."""

    code = "saga_finished"


# -- definitions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SagaContext:
    """What a step's action sees: the saga's id, its input, and earlier steps' results."""

    saga_id: UUID
    data: Mapping[str, Any]
    results: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Local:
    """A step (or compensation) applied by the ledger: ``build`` makes its command."""

    build: Callable[[SagaContext], Command]
    #: Refusals that mean the work is done already (for compensations: a reservation that
    #: expired needs no release).
    done_when: frozenset[str] = frozenset()
    #: For a compensation: of the refusals in ``done_when``, those that say the work was
    #: resolved the other way instead (a hold captured, where voided or expired is undone;
    #: one code covers all three). Given the refusal, a sentence saying what was done and
    #: cannot be undone here, or None if it was undone. The saga then needs attention:
    #: reported compensated, it would hide money or stock gone for good.
    kept_when: Callable[[DomainError], str | None] | None = None
    #: For a compensation: given a refusal in ``done_when`` that counts a lapse as undone (a
    #: hold's or a reservation's timeout passed, its expiry not yet recorded), the command
    #: that records that expiry, run in the same transaction; None if nothing needs
    #: recording. Unrecorded, the lapse is judged on this writer's clock only: a writer
    #: whose clock is behind could still capture the hold or ship the units, while the saga
    #: says compensated.
    record_lapse: Callable[[SagaContext, DomainError], Command | None] | None = None


@dataclass(frozen=True)
class Remote:
    """A call through a port: ``operation`` on ``dependency`` (the circuit breaker's unit),
    with the request ``build`` makes. The idempotency key is derived from the saga and step."""

    dependency: str
    operation: str
    build: Callable[[SagaContext], Mapping[str, Any]]


@dataclass(frozen=True)
class Step:
    name: str
    action: Local | Remote
    compensation: Local | Remote | None = None
    #: Seconds the saga may wait in this step (from when it reaches it) before compensating.
    deadline: int | None = None

    def __post_init__(self) -> None:
        # A step's name is part of its moves' request ids (at most 200 characters, with
        # some 90 taken by the saga's id and the move): a longer one left its saga stuck.
        if not (0 < len(self.name) <= MAX_STEP_NAME and self.name.isprintable()):
            msg = (
                f"a saga step's name is 1-{MAX_STEP_NAME} printable characters, "
                f"got {self.name[:40]!r}{'...' if len(self.name) > 40 else ''}"
                f" ({len(self.name)} characters)"
            )
            raise ValueError(msg)


#: The longest name a saga step may have (see ``Step``).
MAX_STEP_NAME = 100


@dataclass(frozen=True)
class SagaPolicy:
    #: Attempts of a remote step (failures a retry may cure) before the step fails.
    max_attempts: int = 6
    #: Attempts of one compensation before the saga needs a person.
    max_compensation_attempts: int = 8


@dataclass(frozen=True)
class SagaDefinition:
    """A saga's steps, in order: the same for every run, or planned from the run's input
    (``plan``: an order reserves stock once per line)."""

    name: str
    steps: tuple[Step, ...] = ()
    plan: Callable[[Mapping[str, Any]], tuple[Step, ...]] | None = None
    policy: SagaPolicy = field(default_factory=SagaPolicy)

    def __post_init__(self) -> None:
        known = _DEFINITIONS.get(self.name)
        if known is not None and known is not self:
            msg = f"a saga definition named {self.name!r} exists already"
            raise TypeError(msg)
        _DEFINITIONS[self.name] = self

    def steps_for(self, data: Mapping[str, Any]) -> tuple[Step, ...]:
        steps = self.steps if self.plan is None else self.plan(data)
        names = [step.name for step in steps]
        if not steps or len(set(names)) != len(names):
            msg = f"saga {self.name}: steps must be named uniquely, got {names}"
            raise ValueError(msg)
        return steps


_DEFINITIONS: dict[str, SagaDefinition] = {}


def definition(name: str) -> SagaDefinition:
    try:
        return _DEFINITIONS[name]
    except KeyError:
        raise InvalidRequest(f"no saga definition is called {name!r}", kind=name) from None


# -- what to do next ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStep:
    """Run the forward step ``step`` (attempt ``attempt``)."""

    step: Step
    attempt: int


@dataclass(frozen=True)
class Compensate:
    """Run the compensation of ``step`` (attempt ``attempt``)."""

    step: Step
    attempt: int


@dataclass(frozen=True)
class FireDeadline:
    """The deadline of ``step`` (generation ``generation``) has passed."""

    step: str
    generation: int


@dataclass(frozen=True)
class Wait:
    """Nothing to do before ``until`` (None: until a person acts; the saga is finished or
    needs attention)."""

    until: datetime | None


Move = RunStep | Compensate | FireDeadline | Wait


# -- decisions ----------------------------------------------------------------------------------


class Decision(BaseModel):
    """Who decided (a service or a person), why, and when."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    by: str
    why: str
    at: datetime


class DecisionMetadata(Metadata):
    """The metadata of an event that records a decision."""

    decision: Decision | None = None


def decided(by: str, why: str, at: datetime) -> DecisionMetadata:
    """The metadata of the command being executed, with the decision added: all of it (the
    actor, the token that sent a cancel, and the trace too), not only its ids."""
    return DecisionMetadata(
        **{**dict(current_metadata()), "decision": Decision(by=by, why=why, at=at)}
    )


# -- the aggregate ------------------------------------------------------------------------------


class Saga(LedgerAggregate):
    """One run of a saga definition. Invariants: steps run in order, each at most once to
    completion; compensations run in reverse order of the steps that ran, each at most once
    to completion; a finished saga never changes."""

    key_name = "saga_id"
    read_as = "saga"

    if TYPE_CHECKING:
        kind: str
        data: dict[str, Any]
        state: SagaState
        #: Index of the forward step the saga is at (== len(steps) once all are done).
        current: int
        results: dict[str, dict[str, Any]]
        #: Steps (with a compensation) to compensate, the next one last.
        pending_compensations: list[str]
        attempts: int
        #: How many times a person sent it back to compensating (``retry``): each round of
        #: compensation attempts is numbered anew, and its moves need request ids of their own.
        retries: int
        last_error: str | None
        #: The step whose work was resolved the other way (``cannot_undo``), while that is
        #: why the saga needs attention: a person's retry acknowledges it instead of trying it.
        kept: str | None
        retry_at: datetime | None
        #: The deadline of the current step: (step, at, generation), or None.
        deadline: tuple[str, datetime, int] | None
        generation: int
        #: The trace of the command that started the saga (W3C ``traceparent``), which
        #: every step continues; None if it was not traced.
        traceparent: str | None

    class Started(LedgerAggregate.Created):
        kind: str
        data: dict[str, Any]

        def apply(self, saga: Saga) -> None:
            saga.kind = self.kind
            saga.data = dict(self.data)
            saga.state = SagaState.RUNNING
            saga.current = 0
            saga.results = {}
            saga.pending_compensations = []
            saga.attempts = 0
            saga.retries = 0
            saga.last_error = None
            saga.kept = None
            saga.retry_at = None
            saga.deadline = None
            saga.generation = 0
            saga.traceparent = self.meta.traceparent

    class DeadlineSet(LedgerAggregate.Event):
        step: str
        at: datetime
        generation: int

        def apply(self, saga: Saga) -> None:
            saga.deadline = (self.step, self.at, self.generation)
            saga.generation = self.generation

    class StepCompleted(LedgerAggregate.Event):
        step: str
        result: dict[str, Any]

        def apply(self, saga: Saga) -> None:
            saga.results[self.step] = dict(self.result)
            if saga.step_named(self.step).compensation is not None:
                saga.pending_compensations.append(self.step)
            saga.current += 1
            saga.attempts = 0
            saga.last_error = None
            saga.retry_at = None
            saga.deadline = None

    class AttemptFailed(LedgerAggregate.Event):
        """A try of a remote step (or a compensation) failed in a way a retry may cure."""

        step: str
        attempt: int
        error: str
        retry_at: datetime

        def apply(self, saga: Saga) -> None:
            saga.attempts = self.attempt
            saga.last_error = self.error
            saga.retry_at = self.retry_at

    class StepFailed(LedgerAggregate.Event):
        """The step definitely did not happen (and will not): compensate what ran."""

        meta: DecisionMetadata = Field(default_factory=DecisionMetadata)
        step: str
        code: str
        message: str
        #: A remote step whose outcome may still be partly done is compensated too.
        compensate_it: bool

        def apply(self, saga: Saga) -> None:
            saga._begin_compensation(self.step if self.compensate_it else None)
            saga.last_error = f"{self.code}: {self.message}"

    class DeadlineFired(LedgerAggregate.Event):
        meta: DecisionMetadata = Field(default_factory=DecisionMetadata)
        step: str
        generation: int
        compensate_it: bool

        def apply(self, saga: Saga) -> None:
            saga._begin_compensation(self.step if self.compensate_it else None)
            saga.last_error = f"deadline of step {self.step} passed"

    class Cancelled(LedgerAggregate.Event):
        meta: DecisionMetadata = Field(default_factory=DecisionMetadata)
        compensate_current: str | None

        def apply(self, saga: Saga) -> None:
            saga._begin_compensation(self.compensate_current)
            saga.last_error = "cancelled"

    class Compensated(LedgerAggregate.Event):
        meta: DecisionMetadata = Field(default_factory=DecisionMetadata)
        step: str
        result: dict[str, Any]

        def apply(self, saga: Saga) -> None:
            saga.pending_compensations.remove(self.step)
            saga.attempts = 0
            saga.retry_at = None

    class NeedsAttention(LedgerAggregate.Event):
        """Schema v2 added ``kept``: the step's work was resolved the other way, which no
        attempt can undo (else its compensation failed too many times)."""

        class_version = 2
        meta: DecisionMetadata = Field(default_factory=DecisionMetadata)
        step: str
        error: str
        kept: bool = False

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """Version 1 did not say why; its retry tries the compensation again."""
            state["kept"] = False

        def apply(self, saga: Saga) -> None:
            saga.state = SagaState.NEEDS_ATTENTION
            saga.last_error = self.error
            saga.kept = self.step if self.kept else None
            saga.retry_at = None

    class Retried(LedgerAggregate.Event):
        meta: DecisionMetadata = Field(default_factory=DecisionMetadata)

        def apply(self, saga: Saga) -> None:
            saga.state = SagaState.COMPENSATING
            saga.attempts = 0
            saga.retries += 1
            saga.kept = None
            saga.retry_at = None

    class Finished(LedgerAggregate.Event):
        state: SagaState

        def apply(self, saga: Saga) -> None:
            saga.state = self.state
            saga.deadline = None
            saga.retry_at = None

    def _begin_compensation(self, also: str | None) -> None:
        self.state = SagaState.COMPENSATING
        if also is not None and also not in self.pending_compensations:
            self.pending_compensations.append(also)
        self.attempts = 0
        self.retry_at = None
        self.deadline = None

    @classmethod
    def not_found(cls, key: Any) -> DomainError:
        return SagaNotFound(f"no saga has id {key}", saga_id=str(key))

    @property
    def definition(self) -> SagaDefinition:
        return definition(self.kind)

    @property
    def steps(self) -> tuple[Step, ...]:
        return self.definition.steps_for(self.data)

    def step_named(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        msg = f"saga {self.id} ({self.kind}) has no step {name!r}"
        raise KeyError(msg)

    @property
    def context(self) -> SagaContext:
        return SagaContext(self.id, self.data, self.results)

    @property
    def settled(self) -> bool:
        return self.state.finished

    def view(self) -> SagaView:
        steps = self.steps
        step = steps[self.current].name if self.current < len(steps) else None
        if self.state in UNDOING and self.pending_compensations:
            # The compensation under way, or the one that stopped and needs a person.
            step = self.pending_compensations[-1]
        return SagaView(
            saga_id=self.id,
            kind=self.kind,
            state=self.state.value,
            step=step,
            attempts=self.attempts,
            last_error=self.last_error,
            deadline=self.deadline[1] if self.deadline else None,
            retry_at=self.retry_at,
            results={k: dict(v) for k, v in self.results.items()},
            version=self.version,
        )

    # -- what to do next (pure: a function of the state and the time) --------------------

    def next_move(self, now: datetime) -> Move:
        if self.state is SagaState.RUNNING:
            if self.deadline is not None and now >= self.deadline[1]:
                return FireDeadline(self.deadline[0], self.deadline[2])
            if self.retry_at is not None and now < self.retry_at:
                return Wait(self._soonest(self.retry_at))
            return RunStep(self.steps[self.current], self.attempts + 1)
        if self.state is SagaState.COMPENSATING:
            if self.retry_at is not None and now < self.retry_at:
                return Wait(self.retry_at)
            name = self.pending_compensations[-1]
            return Compensate(self.step_named(name), self.attempts + 1)
        return Wait(None)

    def _soonest(self, moment: datetime) -> datetime:
        if self.deadline is not None and self.deadline[1] < moment:
            return self.deadline[1]
        return moment

    @property
    def wake_at(self) -> datetime | None:
        """When the saga next has something to do (None: now, if it is active)."""
        if self.state is SagaState.RUNNING and self.retry_at is not None:
            return self._soonest(self.retry_at)
        return self.retry_at

    # -- recording outcomes --------------------------------------------------------------

    def check_at_step(self, step: str, attempt: int | None = None) -> Step:
        """Refuse unless the saga is running at ``step`` (and at ``attempt``, if given)."""
        self._check_active()
        steps = self.steps
        if (
            self.state is not SagaState.RUNNING
            or self.current >= len(steps)
            or steps[self.current].name != step
            or (attempt is not None and attempt != self.attempts + 1)
        ):
            raise SagaMovedOn(
                f"saga {self.id} is not at step {step!r} attempt {attempt}", saga_id=str(self.id)
            )
        return steps[self.current]

    def check_compensating(self, step: str, attempt: int) -> Step:
        self._check_active()
        if (
            self.state is not SagaState.COMPENSATING
            or not self.pending_compensations
            or self.pending_compensations[-1] != step
            or attempt != self.attempts + 1
        ):
            raise SagaMovedOn(
                f"saga {self.id} is not compensating step {step!r} attempt {attempt}",
                saga_id=str(self.id),
            )
        return self.step_named(step)

    def _check_active(self) -> None:
        if self.state.finished:
            raise SagaFinished(
                f"saga {self.id} has {self.state.value}; it cannot change",
                saga_id=str(self.id),
                state=self.state.value,
            )

    def complete_step(self, step: str, result: Mapping[str, Any], now: datetime) -> None:
        self.trigger_event(self.StepCompleted, step=step, result=dict(result))
        steps = self.steps
        if self.current == len(steps):
            self.trigger_event(self.Finished, state=SagaState.COMPLETED)
            return
        self.enter_step(now)

    def enter_step(self, now: datetime) -> None:
        """Set the current step's deadline, if it has one (with the step that leads to it)."""
        step = self.steps[self.current]
        if step.deadline is not None:
            self.trigger_event(
                self.DeadlineSet,
                step=step.name,
                at=now + timedelta(seconds=step.deadline),
                generation=self.generation + 1,
            )

    def attempt_failed(self, step: str, attempt: int, error: str, retry_at: datetime) -> None:
        self.trigger_event(
            self.AttemptFailed, step=step, attempt=attempt, error=error, retry_at=retry_at
        )

    def fail_step(self, step: Step, code: str, message: str, by: str, now: datetime) -> None:
        self.trigger_event(
            self.StepFailed,
            step=step.name,
            code=code,
            message=message,
            compensate_it=isinstance(step.action, Remote) and step.compensation is not None,
            meta=decided(by, f"step {step.name} failed ({code}): compensate", now),
        )
        self._finish_if_nothing_to_compensate()

    def fire_deadline(self, step: str, generation: int, by: str, now: datetime) -> None:
        current = self.deadline
        if (
            self.state is not SagaState.RUNNING
            or current is None
            or (current[0], current[2]) != (step, generation)
        ):
            # The step completed (or the deadline moved on) before it fired: ignored.
            raise SagaMovedOn(
                f"deadline {generation} of step {step!r} of saga {self.id} no longer applies",
                saga_id=str(self.id),
            )
        if now < current[1]:
            raise SagaMovedOn(f"deadline of saga {self.id} has not passed", saga_id=str(self.id))
        definition_step = self.step_named(step)
        self.trigger_event(
            self.DeadlineFired,
            step=step,
            generation=generation,
            compensate_it=isinstance(definition_step.action, Remote)
            and definition_step.compensation is not None,
            meta=decided(by, f"the deadline of step {step} passed: compensate", now),
        )
        self._finish_if_nothing_to_compensate()

    def cancel(self, by: str, why: str, now: datetime) -> None:
        self._check_active()
        if self.state is not SagaState.RUNNING:
            raise SagaMovedOn(
                f"saga {self.id} is {self.state.value}, not running: nothing to cancel",
                saga_id=str(self.id),
                state=self.state.value,
            )
        step = self.steps[self.current]
        remote = isinstance(step.action, Remote) and step.compensation is not None
        self.trigger_event(
            self.Cancelled,
            compensate_current=step.name if remote else None,
            meta=decided(by, why, now),
        )
        self._finish_if_nothing_to_compensate()

    def compensated(self, step: str, result: Mapping[str, Any], by: str, now: datetime) -> None:
        self.trigger_event(
            self.Compensated,
            step=step,
            result=dict(result),
            meta=decided(by, f"compensated step {step}", now),
        )
        self._finish_if_nothing_to_compensate()

    def cannot_undo(self, step: str, what: str, by: str, now: datetime) -> None:
        """The work of ``step`` was resolved the other way meanwhile (``Local.kept_when``):
        no attempt can undo it, so a person must decide, with ``what`` was done."""
        self.trigger_event(
            self.NeedsAttention,
            step=step,
            error=what,
            kept=True,
            meta=decided(by, f"compensating step {step} cannot undo it: {what}", now),
        )

    def compensation_failed(
        self, step: str, attempt: int, error: str, retry_at: datetime, by: str, now: datetime
    ) -> None:
        limit = self.definition.policy.max_compensation_attempts
        if attempt >= limit:
            self.trigger_event(
                self.NeedsAttention,
                step=step,
                error=error,
                meta=decided(by, f"compensating step {step} failed {attempt} times ({error})", now),
            )
            return
        self.attempt_failed(step, attempt, error, retry_at)

    def retry(self, by: str, why: str, now: datetime) -> None:
        self._check_active()  # finished: the code a cancel gets too
        if self.state is not SagaState.NEEDS_ATTENTION:
            raise SagaMovedOn(
                f"saga {self.id} is {self.state.value}; only a saga that needs attention is "
                "retried",
                saga_id=str(self.id),
                state=self.state.value,
            )
        kept, what = self.kept, self.last_error
        self.trigger_event(self.Retried, meta=decided(by, why, now))
        if kept is None:
            return
        # Its work went the other way (``cannot_undo``): trying again meets the same refusal
        # for ever, and the compensations behind it never run. The person retrying has
        # handled what was done; the step is recorded as settled by them, and the rest run.
        self.trigger_event(
            self.Compensated,
            step=kept,
            result={"kept": what, "acknowledged_by": by},
            meta=decided(by, f"acknowledged that step {kept} cannot be undone: {why}", now),
        )
        self._finish_if_nothing_to_compensate()

    def _finish_if_nothing_to_compensate(self) -> None:
        if not self.pending_compensations:
            self.trigger_event(self.Finished, state=SagaState.COMPENSATED)


@dataclass(frozen=True)
class SagaView:
    saga_id: UUID
    kind: str
    state: str
    step: str | None
    attempts: int
    last_error: str | None
    deadline: datetime | None
    retry_at: datetime | None
    results: dict[str, dict[str, Any]]
    version: int


def _now(aggregates: Aggregates) -> datetime:
    if aggregates.now is None:
        msg = "a saga was driven without the ledger's clock"
        raise RuntimeError(msg)
    return aggregates.now


def json_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A receipt's fields as JSON values (ids as text), for a step's recorded result: lists
    and mappings within too (a linked command's ``outcomes``, which became the text of a
    Python list, ``UUID('...')`` and all, that no later step or reader could use)."""
    return {str(k): _json_value(v) for k, v in fields.items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return json_fields(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    return str(value)


# -- commands (the saga processor sends them; people send cancel and retry) ----------------------


class _SagaCommand(Command):
    """Commands that drive a saga: sent by the processor with ids derived from the saga, the
    step and the attempt, so a repeated delivery is a replay (a deadline has none: see
    ``FireSagaDeadline``). Not offered over HTTP: only the processor knows that a step ran
    (that the gateway charged)."""

    generated_method: ClassVar[bool] = False
    public: ClassVar[bool] = False


#: A step's action or compensation: run by the ledger, or a call through a port.
K = TypeVar("K", Local, Remote)


def _kind_of(saga: Saga, step: str, action: object, kind: type[K]) -> K:
    """``action`` if it is of ``kind``; else refuse the command, which records a step (or
    compensation) of the other kind: a remote step is done only when its remote answered,
    a local one only by running it."""
    if not isinstance(action, kind):
        raise InvalidRequest(
            f"step {step!r} of saga {saga.id} is not {kind.__name__.lower()}; "
            f"it cannot be recorded this way",
            field="step",
        )
    return action


class RunLocalStep(_SagaCommand):
    """Run a local step and record its outcome, in one transaction."""

    saga_id: Uuid
    step: Text
    decided_by: Text = "saga processor"

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        saga = aggregates.get(Saga, self.saga_id)
        step = saga.check_at_step(self.step)
        now = _now(aggregates)
        action = _kind_of(saga, self.step, step.action, Local)
        staged = Staged(aggregates)
        try:
            fields = action.build(saga.context).handle(staged)
        except DomainError as refusal:
            aggregates.confirm_refusal()  # recorded as the step's failure: judged on fresh state
            saga.fail_step(step, refusal.code, refusal.message, self.decided_by, now)
            return {"saga_id": self.saga_id}
        staged.hand_back()
        saga.complete_step(step.name, json_fields(fields), now)
        return {"saga_id": self.saga_id}


class CompleteRemoteStep(_SagaCommand):
    """Record that a remote step succeeded, with what the remote answered."""

    saga_id: Uuid
    step: Text
    result: dict[str, Any]

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        saga = aggregates.get(Saga, self.saga_id)
        step = saga.check_at_step(self.step)
        _kind_of(saga, self.step, step.action, Remote)
        saga.complete_step(self.step, json_fields(self.result), _now(aggregates))
        return {"saga_id": self.saga_id}


class FailStep(_SagaCommand):
    """Record that a step definitely failed (a remote refusal, or attempts exhausted)."""

    saga_id: Uuid
    step: Text
    code: Text
    message: Text
    decided_by: Text = "saga processor"

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        saga = aggregates.get(Saga, self.saga_id)
        step = saga.check_at_step(self.step)
        saga.fail_step(step, self.code, self.message, self.decided_by, _now(aggregates))
        return {"saga_id": self.saga_id}


class RetryLater(_SagaCommand):
    """Record a failed try that a retry may cure, and when to try again."""

    saga_id: Uuid
    step: Text
    attempt: int
    error: Text
    retry_at: Instant
    compensating: bool = False
    decided_by: Text = "saga processor"

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        saga = aggregates.get(Saga, self.saga_id)
        now = _now(aggregates)
        if self.compensating:
            saga.check_compensating(self.step, self.attempt)
            saga.compensation_failed(
                self.step, self.attempt, self.error, self.retry_at, self.decided_by, now
            )
        else:
            saga.check_at_step(self.step, self.attempt)
            saga.attempt_failed(self.step, self.attempt, self.error, self.retry_at)
        return {"saga_id": self.saga_id}


class FireSagaDeadline(_SagaCommand):
    """Fire a step's deadline (ignored if the step completed or the deadline moved on).
    The processor sends it without a request id of its own: a generation's deadline fires
    at most once, and a refusal (not passed yet, by the ledger's clock) is then not
    recorded, so the deadline fires when it is sent again once it has passed."""

    saga_id: Uuid
    step: Text
    generation: int
    decided_by: Text = "saga processor"

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        saga = aggregates.get(Saga, self.saga_id)
        saga.fire_deadline(self.step, self.generation, self.decided_by, _now(aggregates))
        return {"saga_id": self.saga_id}


class RunLocalCompensation(_SagaCommand):
    """Run a local compensation and record it, in one transaction (a refusal is recorded
    as a failed attempt by the processor). A refusal in its ``done_when`` is recorded as
    done, unless its ``kept_when`` says the work went the other way: then the saga needs
    attention."""

    saga_id: Uuid
    step: Text
    attempt: int
    decided_by: Text = "saga processor"

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        saga = aggregates.get(Saga, self.saga_id)
        step = saga.check_compensating(self.step, self.attempt)
        compensation = _kind_of(saga, self.step, step.compensation, Local)
        staged = Staged(aggregates)
        try:
            fields = compensation.build(saga.context).handle(staged)
        except DomainError as refusal:
            if refusal.code not in compensation.done_when:
                raise
            aggregates.confirm_refusal()  # recorded as done: judged on fresh state
            kept = compensation.kept_when(refusal) if compensation.kept_when else None
            if kept is not None:
                saga.cannot_undo(self.step, kept, self.decided_by, _now(aggregates))
                return {"saga_id": self.saga_id}
            fields = {"already": refusal.code}
            if compensation.record_lapse is not None:
                record = compensation.record_lapse(saga.context, refusal)
                if record is not None:  # (refused, the attempt fails: tried again later)
                    recording = Staged(aggregates)
                    record.handle(recording)
                    recording.hand_back()
        else:
            staged.hand_back()
        saga.compensated(self.step, json_fields(fields), self.decided_by, _now(aggregates))
        return {"saga_id": self.saga_id}


class CompleteRemoteCompensation(_SagaCommand):
    """Record that a remote compensation succeeded."""

    saga_id: Uuid
    step: Text
    attempt: int
    result: dict[str, Any]
    decided_by: Text = "saga processor"

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        saga = aggregates.get(Saga, self.saga_id)
        step = saga.check_compensating(self.step, self.attempt)
        _kind_of(saga, self.step, step.compensation, Remote)
        saga.compensated(self.step, json_fields(self.result), self.decided_by, _now(aggregates))
        return {"saga_id": self.saga_id}


class CancelSaga(_SagaCommand):
    """Stop a running saga and compensate what it did (a person's decision)."""

    generated_method = True
    public = True

    saga_id: Uuid
    decided_by: Text
    reason: Text

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        saga = aggregates.get(Saga, self.saga_id)
        saga.cancel(self.decided_by, self.reason, _now(aggregates))
        return {"saga_id": self.saga_id}


class RetrySaga(_SagaCommand):
    """Compensate a saga that needs attention again; acknowledge work gone the other way."""

    generated_method = True
    public = True

    saga_id: Uuid
    decided_by: Text
    reason: Text

    def handle(self, aggregates: Aggregates) -> Mapping[str, Any]:
        saga = aggregates.get(Saga, self.saga_id)
        saga.retry(self.decided_by, self.reason, _now(aggregates))
        return {"saga_id": self.saga_id}
