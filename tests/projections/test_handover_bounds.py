"""A handover to a stream group: every version the group owns afterwards answers as of a
position that never goes back, whatever positions the versions and the group's partitions
stood at, and the group's topic is the one the versions follow."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daybook import Ledger, open_ledger, projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.cli import main
from daybook.infrastructure.readmodels.handover import handover
from daybook.infrastructure.readmodels.queries import ReadModels
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.infrastructure.streaming.worker import StreamApplier
from tests.projections.helpers import assert_tables_match, stored_rows, workload
from tests.projections.test_ownership import GROUP, TOPIC, recorded
from tests.streaming.messages import Stream

pytestmark = pytest.mark.postgres

BOTH = [projections.ACCOUNT_BALANCES, projections.ACCOUNT_STATEMENT]


@pytest.fixture
def ledger(pg_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(pg_url)
    yield ledger
    ledger.close()


def run_runner(ledger: Ledger, url: str, projection: object) -> None:
    runner = ProjectionRunner(event_log_of(ledger), url, [projection])  # type: ignore[list-item]
    runner.run_until_caught_up()
    runner.stop()


def workers(ledger: Ledger, url: str, stream: Stream, built: list[object]) -> None:
    worker = StreamApplier(url, built, group=GROUP, topic=TOPIC, partitions=4, writer="test")  # type: ignore[arg-type]
    try:
        worker.apply(stream.publish(ledger))
    finally:
        worker.close()


def test_versions_handed_together_from_different_positions_keep_the_furthest(
    ledger: Ledger, pg_url: str
) -> None:
    """account_statement stands at P1, account_balances at the head P2; every event after
    P1 went to one account (one partition). Handed together to a group, every partition of
    both has every event up to P2: account_balances must not answer as of P1 again."""
    ids = workload(ledger, 80)
    run_runner(ledger, pg_url, projections.ACCOUNT_STATEMENT)
    for _ in range(5):
        ledger.deposit(ids[0], 7)
    run_runner(ledger, pg_url, projections.ACCOUNT_BALANCES)
    log = event_log_of(ledger)
    head = ledger.head()
    with ReadModels(pg_url, log=log) as views:
        assert views.position("account_balances") == head
        assert views.position("account_statement") < head
        handed = handover(log, pg_url, BOTH, f"stream:{GROUP}", topic=TOPIC, partitions=4)
        assert views.position("account_balances") == head, [h.position for h in handed]
    stream = Stream(4)
    stream.publish(ledger)  # what the relay sent before the group's workers start
    workload(ledger, 40, seed=3, accounts=ids)
    workers(ledger, pg_url, stream, BOTH)
    for projection in BOTH:
        assert_tables_match(ledger, pg_url, projection)


def test_a_group_ahead_of_the_runner_keeps_the_position_its_versions_answer_at(
    ledger: Ledger, pg_url: str
) -> None:
    """The group's account_balances has every event up to the head (its idle partitions'
    bounds moved on with the relay's marks); account_statement, the runner's, stands
    behind. Handed to the group, account_statement is brought up to the group: the group's
    own version must keep answering as of the head."""
    ids = workload(ledger, 80)
    run_runner(ledger, pg_url, projections.ACCOUNT_STATEMENT)
    workload(ledger, 60, seed=2, accounts=ids)
    stream = Stream(4)
    workers(ledger, pg_url, stream, [projections.ACCOUNT_BALANCES])
    log = event_log_of(ledger)
    head = ledger.head()
    with ReadModels(pg_url, log=log) as views:
        assert views.position("account_balances") == head
        handover(
            log, pg_url, [projections.ACCOUNT_STATEMENT], f"stream:{GROUP}", topic=TOPIC,
        )  # fmt: skip
        assert views.position("account_balances") == head
        assert views.position("account_statement") == head
    workload(ledger, 40, seed=3, accounts=ids)
    workers(ledger, pg_url, stream, BOTH)
    for projection in BOTH:
        assert_tables_match(ledger, pg_url, projection)


def test_a_handover_naming_another_topic_than_the_group_follows_is_refused(
    ledger: Ledger, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The group follows TOPIC with daily_activity. A handover run without --topic (its
    default, $DAYBOOK_TOPIC's, is another topic) gave the group a second vector, on a topic
    its workers do not read, and brought the group's own version there from nothing: every
    event applied to it again (daily totals doubled). It is refused, changing nothing."""
    ids = workload(ledger, 60)
    stream = Stream(4)
    workers(ledger, pg_url, stream, [projections.DAILY_ACTIVITY])
    workload(ledger, 20, seed=2, accounts=ids)
    run_runner(ledger, pg_url, projections.ACCOUNT_BALANCES)
    run_runner(ledger, pg_url, projections.ACCOUNT_STATEMENT)  # what recorded() compares
    before = recorded(pg_url)
    totals = stored_rows(pg_url, projections.DAILY_ACTIVITY)
    capsys.readouterr()
    command = ["projections", "handover", "account_balances", "--to", f"stream:{GROUP}"]
    status = main([*command, "--url", pg_url])  # --topic left out
    out, err = capsys.readouterr()
    assert stored_rows(pg_url, projections.DAILY_ACTIVITY) == totals  # nothing applied again
    assert status == 1, out
    assert err.startswith("daybook: ") and "Traceback" not in err and TOPIC in err
    assert recorded(pg_url) == before


def relay_published(url: str, topic: str, partitions: int) -> None:
    """The relay's cursor for ``topic``, as a relay with ``partitions`` leaves it."""
    import asyncio

    import psycopg

    from daybook.infrastructure.streaming.relay import _create_cursor_table, _load_cursor

    async def create() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await _create_cursor_table(conn)
            await _load_cursor(conn, topic, partitions)

    asyncio.run(create())


def test_a_group_with_nothing_recorded_takes_the_count_the_relay_publishes_the_topic_with(
    ledger: Ledger, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The relay publishes TOPIC with 4 partitions (its cursor says so) and the group's
    workers run with 4; the operator runs the handover to the new group without
    --partitions and without $DAYBOOK_PARTITIONS. Converted for the default 8, the
    checkpoint puts events in the wrong partitions and the workers apply some again."""
    ids = workload(ledger, 80)
    stream = Stream(4)
    stream.publish(ledger)
    relay_published(pg_url, TOPIC, 4)
    run_runner(ledger, pg_url, projections.ACCOUNT_STATEMENT)
    run_runner(ledger, pg_url, projections.ACCOUNT_BALANCES)
    command = ["projections", "handover", "account_statement", "--to", f"stream:{GROUP}"]
    options = ["--url", pg_url, "--topic", TOPIC]
    capsys.readouterr()
    assert main([*command, *options, "--partitions", "8"]) == 1  # not the relay's count
    refused = capsys.readouterr().err
    assert "the relay publishes" in refused and "Traceback" not in refused, refused
    assert main([*command, *options]) == 0  # the relay's 4
    workload(ledger, 40, seed=3, accounts=ids)
    workers(ledger, pg_url, stream, [projections.ACCOUNT_STATEMENT])
    assert_tables_match(ledger, pg_url, projections.ACCOUNT_STATEMENT)
