"""The outbox relay against a real PostgreSQL and a real broker: order, crashes, data loss."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daybook import open_ledger
from daybook.infrastructure.streaming.broker import ensure_topic
from daybook.infrastructure.streaming.relay import read_cursor
from scripts.streams import (
    Daybook,
    assert_in_log_order,
    follow_chain,
    open_accounts,
    read_topic,
    unique,
    wait_until,
    write_money,
)

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]

PARTITIONS = 4


def relay(
    url: str, bootstrap: str, topic: str, log: Path, *, faults: str = "", batch: int = 500
) -> Daybook:
    args = ["relay", "--url", url, "--broker", f"kafka://{bootstrap}", "--topic", topic]
    args += ["--partitions", str(PARTITIONS), "--batch-size", str(batch), "--poll-interval", "0.2"]
    return Daybook([*args, "-v"], log, env={"DAYBOOK_FAULTS": faults} if faults else {})


def cursor_position(url: str, topic: str) -> int:
    cursor = read_cursor(url, topic)
    return cursor.position if cursor else 0


@pytest.mark.parametrize("crash_point", ["relay.mid_send", "relay.after_send"])
def test_relay_killed_mid_batch_loses_nothing_and_consumers_drop_the_repeats(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path, crash_point: str
) -> None:
    ledger = open_ledger(pg_url)
    write_money(ledger, open_accounts(ledger, 20), 3000)
    head = ledger.head()
    topic = unique("relay-crash")

    # Killed (SIGKILL, from inside, at an exact point) in its third batch: after its messages
    # were handed to the producer, or after the broker acknowledged them.
    log = tmp_path / "relay1.log"
    first = relay(pg_url, kafka_bootstrap, topic, log, faults=f"{crash_point}:3").start()
    assert first.wait() == -9, first.output
    assert cursor_position(pg_url, topic) == 1000  # two batches of 500 recorded, no more

    second = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay2.log").start()
    try:
        wait_until(lambda: cursor_position(pg_url, topic) == head, "the relay to catch up")
    finally:
        assert second.stop() == 0, second.output

    seen = read_topic(kafka_bootstrap, topic, PARTITIONS, until_positions=head)
    applied, duplicates, gaps = follow_chain(seen)
    assert sorted(applied) == list(range(1, head + 1))
    if crash_point == "relay.after_send":
        assert duplicates == 500  # the acknowledged, unrecorded batch came again
    assert gaps == 0
    assert_in_log_order(seen)
    ledger.close()


def test_a_relay_run_with_another_partition_count_than_its_topic_is_refused_then_runs_with_it(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The topic exists with 2 partitions; a relay started with 4 is an operator's mistake:
    it exits 1 with one line and the code, no traceback, having published nothing. Started
    again with 2, as it said, it publishes (its first run's cursor does not refuse that)."""
    topic = unique("two")
    assert asyncio.run(ensure_topic(kafka_bootstrap, topic, 2)) == 2
    ledger = open_ledger(pg_url)
    write_money(ledger, open_accounts(ledger, 4), 10)
    head = ledger.head()
    ledger.close()
    wrong = relay(pg_url, kafka_bootstrap, topic, tmp_path / "wrong.log").start()
    try:
        assert wrong.wait() == 1, wrong.output
    finally:
        wrong.stop()
    assert "Traceback" not in wrong.output, wrong.output
    assert "refused (partitioning_mismatch)" in wrong.output, wrong.output
    assert "start it with --partitions 2" in wrong.output
    assert read_cursor(pg_url, topic) is None  # nothing published: no count kept
    args = ["relay", "--url", pg_url, "--broker", f"kafka://{kafka_bootstrap}", "--topic", topic]
    right = Daybook([*args, "--partitions", "2", "-v"], tmp_path / "right.log").start()
    try:
        wait_until(lambda: cursor_position(pg_url, topic) == head, "the relay to publish")
    finally:
        assert right.stop() == 0, right.output
