"""What reads and status say about a version its stream group stopped: where it stopped, not
where the group went on to without it."""

from __future__ import annotations

import pytest

from daybook import open_ledger
from daybook.domain.accounts import Account
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.readmodels.catalog import VersionState
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.queries import ReadModels, StaleRead
from daybook.infrastructure.readmodels.reconcile import VersionStopped, reconcile
from daybook.infrastructure.readmodels.reconciler import ContinuousReconciler, last_runs
from daybook.infrastructure.readmodels.status import projection_status
from daybook.infrastructure.streaming.worker import StreamApplier
from daybook.projections.model import Column, LogEvent, Projection, Rows, Table, event_type
from scripts.streams import unique
from tests.projections.helpers import version_record
from tests.streaming.messages import Stream

pytestmark = pytest.mark.postgres

SUMS = Table("audit_sums", (Column("account_id"), Column("total", "bigint")), ("account_id",))


def _sum(event: LogEvent, rows: Rows) -> None:
    key = (event.originator_id,)
    row = rows.get(SUMS.name, key) or {"account_id": event.originator_id, "total": 0}
    amount = int(event.data["amount"])
    # A deposit of 13 makes a total no bigint holds: the database refuses the rows.
    total = 2**63 if amount == 13 else int(row["total"] or 0) + amount
    rows.put(SUMS.name, {**row, "total": total})


SUMMED = Projection("audit_sums", 1, (SUMS,), {event_type(Account.Deposited): _sum})


def test_reads_of_a_serving_version_the_group_stopped_do_not_claim_events_it_lacks(
    pg_url: str,
) -> None:
    """A serving version owned by a stream group is stopped when the database refuses its
    rows; the group goes on with its other versions, and its partition vector moves on.
    The stopped version's rows stay where they were: a read with ``min_position`` past the
    stop must not answer from them as if every event up to that position were applied."""
    ledger = open_ledger(pg_url)
    group = unique("g")
    worker = StreamApplier(pg_url, [SUMMED], group=group, topic="t", partitions=1, writer="test")
    try:
        account = ledger.open_account("ann", "EUR").account_id
        ledger.deposit(account, 100)
        stream = Stream(1)
        worker.apply(stream.publish(ledger))
        with ReadModels(pg_url) as reads:
            first = reads.row(SUMMED, SUMS.name, (str(account),), timeout=5)
        assert first.value is not None and first.value["total"] == 100  # it serves

        ledger.deposit(account, 13)  # its rows are refused: the version stops
        worker.apply(stream.publish(ledger))
        receipt = ledger.deposit(account, 50)
        worker.apply(stream.publish(ledger))

        record = version_record(pg_url, "audit_sums", 1)
        assert record is not None and record.state is VersionState.STOPPED

        (status,) = [s for s in projection_status(event_log_of(ledger), pg_url)
                     if s.name == "audit_sums"]  # fmt: skip
        problems = []
        # What was applied: nothing after the deposit of 100.
        if status.position >= receipt.position:
            problems.append(
                f"status says the stopped version is at {status.position} (head "
                f"{status.head}, lag {status.lag_events}): events it never applied"
            )
        with ReadModels(pg_url) as reads:
            try:
                answer = reads.row(
                    SUMMED, SUMS.name, (str(account),), min_position=receipt.position, timeout=1
                )
            except StaleRead:
                answer = None  # refused loudly: fine
        if answer is not None and (answer.value or {}).get("total") not in (163, 150):
            problems.append(
                f"read as of position {answer.as_of_position} (asked {receipt.position}) "
                f"answered {answer.value}: the deposits of 13 and 50 are not in it"
            )
        assert not problems, problems
    finally:
        worker.close()
        ledger.close()


NOTES = Table(
    "audit_notes",
    (Column("account_id"), Column("total", "bigint"), Column("note")),
    ("account_id",),
)


def _note(event: LogEvent, rows: Rows) -> None:
    key = (event.originator_id,)
    row = rows.get(NOTES.name, key) or {"account_id": event.originator_id, "total": 0}
    amount = int(event.data["amount"])
    # PostgreSQL refuses a NUL in text: the group stops the version at a deposit of 13.
    note = "a\x00b" if amount == 13 else "ok"
    rows.put(NOTES.name, {**row, "total": int(row["total"] or 0) + amount, "note": note})


NOTED = Projection("audit_notes", 1, (NOTES,), {event_type(Account.Deposited): _note})


def test_reconcile_refuses_a_version_its_group_stopped_and_repairs_nothing(pg_url: str) -> None:
    """The group's vector went on without the stopped version: compared with the log at that
    vector it shows the events it never applied as drift, and a repair would write them into
    a version nobody follows (its checkpoint still where it stopped). Refused, with what to
    do; its rows stay as the group left them."""
    ledger = open_ledger(pg_url)
    worker = StreamApplier(
        pg_url, [NOTED], group=unique("g"), topic="t", partitions=1, writer="test"
    )
    try:
        account = ledger.open_account("ann", "EUR").account_id
        stream = Stream(1)
        for amount in (100, 13, 50):
            ledger.deposit(account, amount)
            worker.apply(stream.publish(ledger))
        with ReadModels(pg_url) as reads:
            before = reads.row(NOTED, NOTES.name, (str(account),), timeout=1).value
        assert before is not None and before["total"] == 100

        for repair in (False, True):
            with pytest.raises(VersionStopped) as refused:
                reconcile(event_log_of(ledger), pg_url, NOTED, repair=repair)
            assert refused.value.code == "version_stopped"
            assert "daybook projections rebuild audit_notes" in str(refused.value)
        with ReadModels(pg_url) as reads:
            assert reads.row(NOTED, NOTES.name, (str(account),), timeout=1).value == before
        # The continuous reconciler records no run for it (nothing was compared), failed or
        # not: it says why in its log, as status and /health do.
        service = ContinuousReconciler(
            event_log_of(ledger), pg_url, [NOTED], every_events=1, every_seconds=0
        )
        assert service.run_due() == []
        store = open_store(pg_url)
        try:
            assert ("audit_notes", 1) not in last_runs(store)
        finally:
            store.close()
    finally:
        worker.close()
        ledger.close()
