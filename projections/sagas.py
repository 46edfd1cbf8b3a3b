"""The ``sagas`` read model: each saga's state, step, deadline, attempts and last error, and
when it next has something to do (``wake_at``, which the saga processor polls); and how many
sagas are in each state (``saga_states``, which gauges and the dashboard read)."""

from __future__ import annotations

from daybook.domain.sagas import Saga, definition
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

SAGAS = Table(
    "sagas",
    (
        Column("saga_id"),
        Column("kind"),
        #: The order id, for an order saga (else empty).
        Column("reference"),
        Column("state"),
        Column("step"),
        #: The names of its steps, in order, separated by spaces.
        Column("plan"),
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


def _step_completed(event: LogEvent, rows: Rows) -> None:
    plan = str(_existing(rows, event)["plan"]).split(" ")
    done = plan.index(str(event.data["step"]))
    _update(
        event,
        rows,
        step=plan[min(done + 1, len(plan) - 1)],
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
        step=data["step"],
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
    _update(event, rows, **changes)


def _compensated(event: LogEvent, rows: Rows) -> None:
    _update(event, rows, step=event.data["step"], attempts=0, retry_at=None)


def _needs_attention(event: LogEvent, rows: Rows) -> None:
    data = event.data
    _update(
        event,
        rows,
        state="needs_attention",
        step=data["step"],
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
    version=2,
    tables=(SAGAS, SAGA_STATES),
    handlers=_HANDLERS,
)
