"""A handover to the runner converts a group's vector for its own topic's partitions, a
handover reads no event it need not (it holds the locks every writer waits for), and one
killed half-way changes nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daybook import Ledger, open_ledger, projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.cli import main
from daybook.infrastructure.readmodels.handover import handover
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.infrastructure.streaming import envelope
from tests.projections.helpers import assert_tables_match, workload
from tests.projections.test_handover_bounds import relay_published
from tests.projections.test_ownership import GROUP, TOPIC, applier, uneven
from tests.streaming.messages import Stream

pytestmark = pytest.mark.postgres


@pytest.fixture
def ledger(pg_url: str) -> Iterator[Ledger]:
    ledger = open_ledger(pg_url)
    yield ledger
    ledger.close()


def test_to_runner_converts_the_vector_for_the_partitions_of_the_topic_the_version_follows(
    ledger: Ledger, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The group follows TOPIC with 4 partitions, unevenly applied. The relay's cursor for
    another topic (a new topic the operator moves to, with 8 partitions: the README's way to
    change the partition count) is in the event store. `handover --to runner` with that topic
    as --topic/$DAYBOOK_TOPIC converted TOPIC's 4-partition vector as if it had 8: events
    applied twice, others skipped, without a word."""
    workload(ledger, 200)
    uneven(ledger, pg_url)  # partitions 0, 1 through, 2 half-way, 3 not at all
    relay_published(pg_url, "new.events", 8)
    names = [p.name for p in projections.ALL]
    capsys.readouterr()
    status = main(
        ["projections", "handover", *names, "--to", "runner", "--url", pg_url,
         "--topic", "new.events"]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    runner = ProjectionRunner(event_log_of(ledger), pg_url, projections.ALL)
    workload(ledger, 30, seed=7)
    runner.run_until_caught_up()
    runner.stop()
    wrong = []
    for projection in projections.ALL:
        try:
            assert_tables_match(ledger, pg_url, projection)
        except AssertionError as error:
            wrong.append(str(error).splitlines()[0])
    assert not wrong, wrong


class CountingLog:
    """The event log, counting the events the handover reads from it."""

    def __init__(self, log: object) -> None:
        self.log = log
        self.read_events = 0

    def read(self, after: int, limit: int):  # type: ignore[no-untyped-def]
        events = self.log.read(after, limit)  # type: ignore[attr-defined]
        self.read_events += len(events)
        return events

    def scan(self, after: int, limit: int):  # type: ignore[no-untyped-def]
        raw = self.log.scan(after, limit)  # type: ignore[attr-defined]
        self.read_events += len(raw)
        return raw

    def __getattr__(self, name: str) -> object:
        return getattr(self.log, name)


def test_a_group_caught_up_with_idle_partitions_is_handed_to_the_runner_without_rereading_the_log(
    ledger: Ledger, pg_url: str
) -> None:
    """Every partition's bound is at the head (five of eight idle: no event ever, their
    marks moved them on). Nothing is to be applied, yet the handover, holding the locks
    every writer waits for, read and decoded the whole log from position 0: it started each
    partition from its last event (0 for an idle one) rather than its bound."""
    accounts = [ledger.open_account(f"o{i}", "EUR").account_id for i in range(3)]
    for n in range(600):
        ledger.deposit(accounts[n % 3], 10 + n)
    messages = Stream(8).publish(ledger)
    used = {m.partition for m in messages if not envelope.decode(m.value).is_mark}
    assert len(used) <= 3
    worker = applier(pg_url, partitions=8)
    try:
        worker.apply(messages)
    finally:
        worker.close()
    log = CountingLog(event_log_of(ledger))
    handed = handover(
        log,
        pg_url,
        [projections.ACCOUNT_BALANCES],
        "runner",
        topic=TOPIC,  # type: ignore[arg-type]
    )
    assert [h.applied for h in handed] == [0]
    assert [h.position for h in handed] == [ledger.head()]
    assert log.read_events == 0, f"read {log.read_events} events of {ledger.head()}"


def test_a_handover_killed_half_way_changes_nothing_and_runs_again(
    ledger: Ledger, pg_url: str
) -> None:
    """The handover process is SIGKILLed while bringing its third version over (the first
    two brought already, in its open transaction): nothing is changed; run again, every
    version ends equal to a full replay."""
    import os
    import subprocess
    import sys

    from tests.projections.test_ownership import snapshot

    workload(ledger, 200)
    uneven(ledger, pg_url)
    before = snapshot(pg_url)
    names = [p.name for p in projections.ALL]
    command = [
        sys.executable, "-m", "daybook.infrastructure.cli", "projections", "handover", *names,
        "--to", "runner", "--url", pg_url, "--topic", TOPIC,
    ]  # fmt: skip
    env = {**os.environ, "DAYBOOK_FAULTS": "log.read:3"}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    assert snapshot(pg_url) == before
    assert main(["projections", "handover", *names, "--to", "runner", "--url", pg_url,
                 "--topic", TOPIC]) == 0  # fmt: skip
    assert main(["projections", "handover", *names, "--to", "runner", "--url", pg_url,
                 "--topic", TOPIC]) == 0  # twice: already the runner's  # fmt: skip
    runner = ProjectionRunner(event_log_of(ledger), pg_url, projections.ALL)
    workload(ledger, 30, seed=7)
    runner.run_until_caught_up()
    runner.stop()
    for projection in projections.ALL:
        assert_tables_match(ledger, pg_url, projection)


def test_a_version_handed_to_a_group_standing_at_the_head_does_not_rescan_the_log(
    ledger: Ledger, pg_url: str
) -> None:
    """The group owns account_balances and stands at the head; the runner's
    account_statement stands there too. Nothing is to be applied or looked up before the
    group's bounds, yet the handover scanned the log from position 0 (once per version
    handed), holding the locks every writer of both owners waits for."""
    from tests.projections.test_handover_bounds import run_runner, workers

    ids = workload(ledger, 300)
    stream = Stream(4)
    workers(ledger, pg_url, stream, [projections.ACCOUNT_BALANCES])
    run_runner(ledger, pg_url, projections.ACCOUNT_STATEMENT)
    log = CountingLog(event_log_of(ledger))
    handed = handover(
        log,
        pg_url,
        [projections.ACCOUNT_STATEMENT],
        f"stream:{GROUP}",
        topic=TOPIC,  # type: ignore[arg-type]
    )
    assert [h.position for h in handed] == [ledger.head()]
    workload(ledger, 20, seed=9, accounts=ids)
    workers(ledger, pg_url, stream, [projections.ACCOUNT_BALANCES, projections.ACCOUNT_STATEMENT])
    assert_tables_match(ledger, pg_url, projections.ACCOUNT_STATEMENT)
    assert log.read_events == 0, f"read {log.read_events} events of {ledger.head()}"


def test_a_group_new_to_a_topic_takes_the_partition_count_other_groups_record_for_it(
    ledger: Ledger, pg_url: str
) -> None:
    """Before any relay ran (no cursor to say the topic's count), a version handed to a new
    group took the default of 8 partitions, though another group's versions recorded 4 for
    the same topic: its workers, started with 4, were refused (partitioning_mismatch), and
    the 8 progress rows then refused --partitions 4 too. It takes the count recorded."""
    from daybook.infrastructure.readmodels.catalog import VersionCatalog
    from daybook.infrastructure.readmodels.location import open_store
    from tests.projections.test_handover_bounds import run_runner

    workload(ledger, 60)
    for projection in (projections.ACCOUNT_BALANCES, projections.ACCOUNT_STATEMENT):
        run_runner(ledger, pg_url, projection)
    log = event_log_of(ledger)
    handover(log, pg_url, [projections.ACCOUNT_BALANCES], "stream:first", topic=TOPIC, partitions=4)
    handover(log, pg_url, [projections.ACCOUNT_STATEMENT], "stream:second", topic=TOPIC)
    store = open_store(pg_url)
    try:
        catalog = VersionCatalog(store)
        statement = catalog.version(projections.ACCOUNT_STATEMENT.name, 1)
    finally:
        store.close()
    assert statement is not None and statement.partitions == 4
