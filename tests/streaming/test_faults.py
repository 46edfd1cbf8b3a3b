"""Poison events and a broker that loses everything: against the real broker and database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from domain.accounts import Account
from infrastructure import open_ledger
from infrastructure.relay import read_cursor
from infrastructure.streaming import envelope
from infrastructure.streaming.broker import dead_letter_topic
from infrastructure.streaming.progress import read_dead_letters, read_status
from tests import services
from tests.streaming.streams import (
    WAIT,
    open_accounts,
    unique,
    wait_until,
    write_money,
)
from tests.streaming.test_workers import (
    PARTITIONS,
    applied,
    relay,
    worker,
)

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]


def insert_poison(ledger: object) -> tuple[int, int]:
    """A deposit to an account that was never opened, written straight into the log (no
    command would): every projection that needs the account fails on it. Returns its log
    position and partition."""
    aggregate_id = uuid4()
    event = Account.Deposited(
        originator_id=aggregate_id,
        originator_version=2,
        timestamp=datetime.now(UTC),
        amount=5,
    )
    stored = ledger.mapper.to_stored_event(event)  # type: ignore[attr-defined]
    (position,) = ledger.recorder.insert_events([stored])  # type: ignore[attr-defined]
    return position, envelope.partition_for(envelope.partition_key(aggregate_id), PARTITIONS)


async def _first_message(bootstrap: str, topic: str) -> tuple[bytes, bytes, dict[str, bytes]]:
    """The first message found on any partition of ``topic`` (Tansu may have auto-created
    it with 4 partitions before faust declared it with 1)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        message = await asyncio.wait_for(consumer.getone(), WAIT)
        return message.key, message.value, dict(message.headers)
    finally:
        await consumer.stop()


def test_a_poison_event_is_parked_on_the_dead_letter_topic_and_the_rest_goes_on(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 30)
    write_money(ledger, accounts, 500)
    poison, poison_partition = insert_poison(ledger)
    write_money(ledger, accounts, 500, seed=2)
    head = ledger.head()
    topic, group = unique("poison"), unique("group")
    processes = [
        relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log").start(),
        worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "w.log").start(),
    ]
    try:
        wait_until(lambda: applied(pg_url, group, topic) == head - 1, "everything but the poison")
        status = {p.partition: p for p in read_status(pg_url, group, topic)}
        assert status[poison_partition].dead_letters == 1
        assert f"position {poison}" in (status[poison_partition].last_error or "")
        assert status[poison_partition].position > poison  # its partition went on, too
        others = [p for n, p in status.items() if n != poison_partition]
        assert all(p.state == "live" and p.dead_letters == 0 for p in others)
        (letter,) = read_dead_letters(pg_url, group, topic)
        assert letter["position"] == poison and "unknown account" in letter["error"]
        key, value, headers = asyncio.run(_first_message(kafka_bootstrap, dead_letter_topic(topic)))
        assert key == str(poison).encode()
        assert envelope.decode(value).position == poison
        assert b"unknown account" in headers["error"]
    finally:
        for process in processes:
            process.stop()
    ledger.close()


def test_the_broker_losing_everything_is_detected_and_the_log_republished(
    pg_url: str, kafka: services.KafkaHandle, tmp_path: Path
) -> None:
    if kafka.external:
        pytest.skip("needs the broker this session started (it is restarted)")
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 30)
    write_money(ledger, accounts, 1000)
    topic = unique("restart")
    the_relay = relay(pg_url, kafka.bootstrap, topic, tmp_path / "relay.log").start()
    try:
        wait_until(lambda: cursor_position(pg_url, topic) == ledger.head(), "the first events")
        kafka.stop()  # memory storage: topics, messages, group offsets all gone
        write_money(ledger, accounts, 500, seed=2)  # the broker is down meanwhile
        kafka.start()
        write_money(ledger, accounts, 500, seed=3)
        head = ledger.head()
        wait_until(lambda: cursor_position(pg_url, topic) == head, "the catch-up")
        cursor = read_cursor(pg_url, topic)
        assert cursor is not None and cursor.republished >= 1
    finally:
        assert the_relay.stop() == 0, the_relay.output
    # Not checked yet: reading the re-published topic back. In this scenario (clients
    # connected while the broker restarts) a fresh consumer fetched nothing from the
    # restarted Tansu broker, though a minimal produce/restart/consume probe works; see the
    # streaming section of the README.
    ledger.close()


def cursor_position(url: str, topic: str) -> int:
    cursor = read_cursor(url, topic)
    return cursor.position if cursor else 0
