"""Handovers that would make a version's checkpoint claim events its rows lack are refused,
and change nothing: a stopped version (its new owner's checkpoint moves on while nobody
writes it, so after a resume the events in between were skipped for good), and a version
the group left events out of, handed to the runner (whose position says every event up to
it is in the rows: a balance read as of the head lacked the parked deposit)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daybook import Ledger, open_ledger, projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.readmodels.catalog import VersionCatalog, VersionRecord, VersionState
from daybook.infrastructure.readmodels.handover import HandoverRefused, handover
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.reconcile import reconcile
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.infrastructure.streaming.worker import StreamApplier
from daybook.projections.accounts import ACCOUNT_BALANCES, DEPOSITED
from daybook.projections.model import LogEvent, Projection, Rows
from tests.projections.helpers import assert_tables_match, workload
from tests.projections.test_ownership import GROUP, TOPIC
from tests.streaming.messages import Stream

pytestmark = pytest.mark.postgres

BALANCES = ACCOUNT_BALANCES.name


def _fails_on_777(event: LogEvent, rows: Rows) -> None:
    if int(event.data["amount"]) == 777:
        raise RuntimeError("a bug in the first deployed account_balances v1")
    ACCOUNT_BALANCES.handlers[DEPOSITED](event, rows)


#: account_balances v1 as first deployed: it fails on a deposit of 777.
BUGGY = Projection(
    BALANCES,
    ACCOUNT_BALANCES.version,
    ACCOUNT_BALANCES.tables,
    {**ACCOUNT_BALANCES.handlers, DEPOSITED: _fails_on_777},
)
WITH_BUG = [BUGGY if p.name == BALANCES else p for p in projections.ALL]


@pytest.fixture
def ledger(pg_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(pg_url)
    yield ledger
    ledger.close()


def record(url: str) -> VersionRecord:
    store = open_store(url)
    try:
        found = VersionCatalog(store).version(BALANCES, ACCOUNT_BALANCES.version)
    finally:
        store.close()
    assert found is not None
    return found


def grouped(ledger: Ledger, url: str, *, park: bool = False) -> EventLog:
    """The runner builds every projection; account_balances goes to the group, whose
    workers (their code failing on a deposit of 777) apply the log, with such a deposit in
    it when ``park``. The log, for the handovers."""
    ids = workload(ledger, 40)
    log = event_log_of(ledger)
    runner = ProjectionRunner(log, url, projections.ALL)
    runner.run_until_caught_up()
    runner.stop()
    handover(log, url, [ACCOUNT_BALANCES], f"stream:{GROUP}", topic=TOPIC, partitions=4)
    worker = StreamApplier(url, WITH_BUG, group=GROUP, topic=TOPIC, partitions=4, writer="t")
    stream = Stream(4)
    try:
        if park:
            ledger.deposit(ids[0], 777)  # parked by the group, left out of the version
            ledger.deposit(ids[0], 1)
        for _ in range(5):
            worker.apply(stream.publish(ledger))
    finally:
        worker.close()
    return log


def test_a_stopped_version_is_not_handed_over(ledger: Ledger, pg_url: str) -> None:
    ids = workload(ledger, 40)
    log = event_log_of(ledger)
    runner = ProjectionRunner(log, pg_url, WITH_BUG, max_attempts=2, retry_backoff=0.001)
    runner.run_until_caught_up()
    ledger.deposit(ids[0], 777)
    workload(ledger, 10, seed=5, accounts=ids)
    runner.run_until_caught_up()  # account_balances stops at the 777 deposit
    runner.stop()
    before = record(pg_url)
    assert before.state is VersionState.STOPPED
    with pytest.raises(HandoverRefused, match=r"is stopped.*resume it first"):
        handover(log, pg_url, [ACCOUNT_BALANCES], f"stream:{GROUP}", topic=TOPIC, partitions=4)
    assert record(pg_url) == before  # nothing was handed over


def test_a_version_the_group_left_an_event_out_of_is_not_handed_to_the_runner(
    ledger: Ledger, pg_url: str
) -> None:
    log = grouped(ledger, pg_url, park=True)
    assert reconcile(log, pg_url, ACCOUNT_BALANCES).clean  # as the group wrote it
    before = record(pg_url)
    with pytest.raises(HandoverRefused, match=r"lacks 1 event.*parked.*rebuild"):
        handover(log, pg_url, [ACCOUNT_BALANCES], "runner", topic=TOPIC)
    assert record(pg_url) == before
    # Still the group's, and still what the group wrote: every other event is in.
    assert reconcile(log, pg_url, ACCOUNT_BALANCES).clean


def test_a_version_the_group_left_nothing_out_of_goes_to_the_runner(
    ledger: Ledger, pg_url: str
) -> None:
    log = grouped(ledger, pg_url)
    (handed,) = handover(log, pg_url, [ACCOUNT_BALANCES], "runner", topic=TOPIC)
    assert record(pg_url).owner == "runner"
    assert_tables_match(ledger, pg_url, ACCOUNT_BALANCES)
    assert handed.position == ledger.head()


def test_a_version_a_group_stopped_is_not_resumed(ledger: Ledger, pg_url: str) -> None:
    """A group stops a version at its switch (its rows repeat a key); the group's partition
    vector, which is the version's checkpoint, goes on meanwhile. Resumed, the version went
    on from there: the events in between were never in it."""
    from daybook.infrastructure.readmodels.catalog import IllegalTransition

    workload(ledger, 20)
    log = event_log_of(ledger)
    runner = ProjectionRunner(log, pg_url, projections.ALL)
    runner.run_until_caught_up()
    runner.stop()
    handover(log, pg_url, [ACCOUNT_BALANCES], f"stream:{GROUP}", topic=TOPIC, partitions=4)
    store = open_store(pg_url)
    try:
        catalog = VersionCatalog(store)
        catalog.stop(BALANCES, ACCOUNT_BALANCES.version, "as a worker's switch stops one")
        before = record(pg_url)
        with pytest.raises(IllegalTransition, match=r"stream:g owns it.*bump its version"):
            catalog.resume(BALANCES, ACCOUNT_BALANCES.version)
    finally:
        store.close()
    # Nor handed to the runner: the advice is the rebuild (a resume would be refused).
    with pytest.raises(HandoverRefused, match=r"is stopped.*rebuild it under a new version"):
        handover(log, pg_url, [ACCOUNT_BALANCES], "runner", topic=TOPIC)
    assert record(pg_url) == before


def test_a_letter_an_older_daybook_parked_counts_for_the_version(
    ledger: Ledger, pg_url: str
) -> None:
    """A letter parked before letters named their versions names none: it may be one the
    group left out of this very version, so it refuses the handover to the runner as a
    letter naming the version does (ignoring such letters lost the parked deposit again)."""
    log = grouped(ledger, pg_url, park=True)
    store = open_store(pg_url)
    try:  # as a daybook before letters named versions parked it
        store.execute("UPDATE daybook_stream_dead_letters SET versions = NULL")
    finally:
        store.close()
    before = record(pg_url)
    with pytest.raises(HandoverRefused, match=r"lacks 1 event.*before daybook 0.3.*rebuild"):
        handover(log, pg_url, [ACCOUNT_BALANCES], "runner", topic=TOPIC)
    assert record(pg_url) == before
