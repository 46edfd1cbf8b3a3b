"""The ``sagas`` read model: each saga's state, step, deadline, attempts and last error, and
when it next has something to do (``wake_at``, which the saga processor polls); and how many
sagas are in each state (``saga_states``, which gauges and the dashboard read)."""

from __future__ import annotations

from collections.abc import Mapping

from daybook.domain.sagas import UNDOING, Saga, definition
from daybook.projections.holds import instant
from daybook.projections.model import (
    Column,
    Handler,
    LogEvent,
    Projection,
    Row,
    Rows,
    Table,
    event_type,
    iso_time,
)

#: ``wake_at`` of a saga that has something to do now (sorts before every instant).
NOW = ""

#: States in which a saga's step is the compensation under way (``Saga.view``).
_UNDOING = frozenset(state.value for state in UNDOING)

SAGAS = Table(
    "sagas",
    (
        Column("saga_id"),
        Column("kind"),
        #: The order id, for an order saga (else empty).
        Column("reference"),
        Column("state"),
        #: As ``ledger.saga(id).step`` says it: the step it is at, or while it compensates
        #: (or needs attention), the compensation under way; none once every step is done.
        Column("step", nullable=True),
        #: The names of its steps, in order, separated by spaces.
        Column("plan"),
        #: How many of them are done.
        Column("current", "bigint"),
        #: The done steps whose work is still to be compensated, in the order they were
        #: done, separated by spaces (the last is compensated first).
        Column("pending"),
        #: The steps of its plan that have a compensation, separated by spaces.
        Column("compensable"),
        Column("attempts", "bigint"),
        Column("last_error", nullable=True),
        Column("deadline_at", nullable=True),
        Column("retry_at", nullable=True),
        Column("wake_at", nullable=True),
        Column("started_at"),
        Column("updated_at"),
        Column("version", "bigint"),
        Column("position", "bigint"),
    ),
    key=("saga_id",),
    indexes=(("state", "wake_at"), ("reference",)),
)


#: How many sagas are in each state. Finished sagas keep their ``sagas`` row (one per order,
#: for months): counting those rows read every saga ever started, once a second in the saga
#: processor and at every poll of the dashboard. This table has a row per state.
SAGA_STATES = Table(
    "saga_states",
    (Column("state"), Column("sagas", "bigint")),
    key=("state",),
    summed=True,
)


def _count(rows: Rows, state: str, change: int) -> None:
    row = rows.get(SAGA_STATES.name, (state,))
    before = 0 if row is None else int(row["sagas"] or 0)
    rows.put(SAGA_STATES.name, {"state": state, "sagas": before + change})


def _started(event: LogEvent, rows: Rows) -> None:
    data = event.data
    steps = definition(str(data["kind"])).steps_for(data["data"])
    at = iso_time(event.timestamp)
    rows.put(
        SAGAS.name,
        {
            "saga_id": event.originator_id,
            "kind": data["kind"],
            "reference": str(data["data"].get("order_id", "")),
            "state": "running",
            "step": steps[0].name,
            "plan": " ".join(step.name for step in steps),
            "current": 0,
            "pending": "",
            "compensable": " ".join(s.name for s in steps if s.compensation is not None),
            "attempts": 0,
            "last_error": None,
            "deadline_at": None,
            "retry_at": None,
            "wake_at": NOW,
            "started_at": at,
            "updated_at": at,
            "version": event.originator_version,
            "position": event.position,
        },
    )
    _count(rows, "running", 1)


def _existing(rows: Rows, event: LogEvent) -> Row:
    row = rows.get(SAGAS.name, (event.originator_id,))
    if row is None:
        msg = f"{event.type} at position {event.position} for unknown saga {event.originator_id}"
        raise LookupError(msg)
    return row


def _update(event: LogEvent, rows: Rows, **changes: object) -> None:
    before = _existing(rows, event)
    row = {**before, **changes}
    row["step"] = _step(row)
    if row["state"] != before["state"]:
        _count(rows, str(before["state"]), -1)
        _count(rows, str(row["state"]), 1)
    row["version"] = event.originator_version
    row["position"] = event.position
    row["updated_at"] = iso_time(event.timestamp)
    if row["state"] in ("running", "compensating"):
        retry, deadline = row["retry_at"], row["deadline_at"]
        wake = NOW if retry is None else retry
        if row["state"] == "running" and deadline is not None and retry is not None:
            wake = min(str(retry), str(deadline))
        row["wake_at"] = wake
    else:
        row["wake_at"] = None
    rows.put(SAGAS.name, row)  # type: ignore[arg-type]


def _deadline_set(event: LogEvent, rows: Rows) -> None:
    _update(event, rows, deadline_at=instant(event.data["at"]))


def _step(row: Mapping[str, object]) -> str | None:
    """The step ``Saga.view`` names for this row's saga."""
    pending = _pending(row)
    if row["state"] in _UNDOING and pending:
        return pending[-1]
    plan = str(row["plan"]).split(" ")
    current = int(str(row["current"] or 0))
    return plan[current] if current < len(plan) else None


def _pending(row: Mapping[str, object]) -> list[str]:
    return str(row["pending"]).split()


def _with(pending: list[str], step: object) -> str:
    """``pending`` with ``step`` last, unless it is there (``Saga._begin_compensation``)."""
    if step is not None and str(step) not in pending:
        pending = [*pending, str(step)]
    return " ".join(pending)


def _step_completed(event: LogEvent, rows: Rows) -> None:
    row = _existing(rows, event)
    step = str(event.data["step"])
    pending = _pending(row)
    if step in str(row["compensable"]).split():  # (``StepCompleted.apply``)
        pending.append(step)
    _update(
        event,
        rows,
        current=int(row["current"] or 0) + 1,
        pending=" ".join(pending),
        attempts=0,
        last_error=None,
        retry_at=None,
        deadline_at=None,
    )


def _attempt_failed(event: LogEvent, rows: Rows) -> None:
    data = event.data
    _update(
        event,
        rows,
        attempts=int(data["attempt"]),
        last_error=data["error"],
        retry_at=instant(data["retry_at"]),
    )


def _compensating(event: LogEvent, rows: Rows) -> None:
    data = event.data
    error = {
        event_type(Saga.StepFailed): f"{data.get('code')}: {data.get('message')}",
        event_type(Saga.DeadlineFired): f"deadline of step {data.get('step')} passed",
        event_type(Saga.Cancelled): "cancelled",
        event_type(Saga.Retried): None,
    }[event.type]
    changes: dict[str, object] = {
        "state": "compensating",
        "attempts": 0,
        "retry_at": None,
        "deadline_at": None,
    }
    if error is not None:
        changes["last_error"] = error
    also = {
        event_type(Saga.StepFailed): data.get("step") if data.get("compensate_it") else None,
        event_type(Saga.DeadlineFired): data.get("step") if data.get("compensate_it") else None,
        event_type(Saga.Cancelled): data.get("compensate_current"),
        event_type(Saga.Retried): None,
    }[event.type]
    changes["pending"] = _with(_pending(_existing(rows, event)), also)
    _update(event, rows, **changes)


def _compensated(event: LogEvent, rows: Rows) -> None:
    pending = _pending(_existing(rows, event))
    if event.data["step"] in pending:
        pending.remove(str(event.data["step"]))
    _update(event, rows, pending=" ".join(pending), attempts=0, retry_at=None)


def _needs_attention(event: LogEvent, rows: Rows) -> None:
    data = event.data
    _update(
        event,
        rows,
        state="needs_attention",
        last_error=data["error"],
        retry_at=None,
    )


def _finished(event: LogEvent, rows: Rows) -> None:
    _update(event, rows, state=event.data["state"], retry_at=None, deadline_at=None)


_HANDLERS: dict[str, Handler] = {
    event_type(Saga.Started): _started,
    event_type(Saga.DeadlineSet): _deadline_set,
    event_type(Saga.StepCompleted): _step_completed,
    event_type(Saga.AttemptFailed): _attempt_failed,
    event_type(Saga.StepFailed): _compensating,
    event_type(Saga.DeadlineFired): _compensating,
    event_type(Saga.Cancelled): _compensating,
    event_type(Saga.Retried): _compensating,
    event_type(Saga.Compensated): _compensated,
    event_type(Saga.NeedsAttention): _needs_attention,
    event_type(Saga.Finished): _finished,
}

SAGA_LIST = Projection(
    name="sagas",
    # 2: the sagas in each state counted as they move (saga_states), not by reading them all.
    # 3: ``step`` as the write side says it (with ``current`` and ``pending`` to know it).
    version=3,
    tables=(SAGAS, SAGA_STATES),
    handlers=_HANDLERS,
)
