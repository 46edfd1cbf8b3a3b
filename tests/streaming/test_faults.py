"""Poison events and a broker that loses everything: against the real broker and database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from daybook import open_ledger
from daybook.domain.accounts import Account
from daybook.infrastructure.streaming import envelope
from daybook.infrastructure.streaming.broker import dead_letter_topic
from daybook.infrastructure.streaming.progress import read_dead_letters, read_status
from daybook.infrastructure.streaming.relay import read_cursor
from daybook.infrastructure.urls import postgres_params
from scripts import services
from scripts.streams import (
    WAIT,
    follow_chain,
    open_accounts,
    read_topic,
    unique,
    wait_until,
    write_money,
)
from tests.streaming.test_workers import (
    PARTITIONS,
    applied,
    reference_tables,
    relay,
    tables,
    worker,
)

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]


def log_with_poison(ledger: Any, accounts: int, transfers: int) -> tuple[int, int]:
    """``transfers`` among ``accounts`` new accounts, a poison event (``insert_poison``),
    then as many transfers again; the poison's log position and partition."""
    opened = open_accounts(ledger, accounts)
    write_money(ledger, opened, transfers)
    poison = insert_poison(ledger)
    write_money(ledger, opened, transfers, seed=2)
    return poison


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
    stored = ledger.service.mapper.to_stored_event(event)  # type: ignore[attr-defined]
    (position,) = ledger.service.recorder.insert_events([stored])  # type: ignore[attr-defined]
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
    poison, poison_partition = log_with_poison(ledger, 30, 500)
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


async def _put_foreign_message(bootstrap: str, topic: str, value: bytes) -> None:
    """``value`` on ``topic``'s partition 0, from a producer that is not the relay (with a
    larger request limit than a worker's)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=4 << 20)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"foreign", partition=0)
    finally:
        await producer.stop()


def test_a_dead_letter_too_large_for_the_broker_goes_without_its_message_and_the_worker_goes_on(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A message the worker parks but cannot put on the dead-letter topic whole (larger
    than its producer may send: 1,000,000 bytes, where the relay's may send 1 MiB) stopped
    the worker, at every start again, since the letter stayed to publish. The letter goes
    without its message, which the dead-letter table keeps, and says so; its error header
    is cut too (the error can quote the message)."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 5)
    write_money(ledger, accounts, 20)
    topic, group = unique("bigletter"), unique("group")
    the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log").start()
    the_worker = None
    try:
        wait_until(lambda: cursor_position(pg_url, topic) == ledger.head(), "the relay")
        # No envelope: parked, with an error that quotes its ``v`` (whole, in the row).
        foreign = b'{"v": "' + b"x" * 1_010_000 + b'"}'
        asyncio.run(_put_foreign_message(kafka_bootstrap, topic, foreign))
        the_worker = worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "w.log").start()
        wait_until(lambda: len(read_dead_letters(pg_url, group, topic)) == 1, "the letter")
        write_money(ledger, accounts, 20, seed=2)  # the worker goes on
        wait_until(lambda: applied(pg_url, group, topic) == ledger.head(), "the later events")
        (letter,) = read_dead_letters(pg_url, group, topic)
        key, value, headers = asyncio.run(_first_message(kafka_bootstrap, dead_letter_topic(topic)))
        assert key == str(letter["position"]).encode()
        assert value == b""
        assert headers["cut"].startswith(f"{len(foreign)} bytes".encode())
        assert len(headers["error"]) == 1000
        assert headers["error"].startswith(b"unsupported envelope version")
        with psycopg.connect(postgres_params(pg_url).conninfo()) as conn:
            row = conn.execute(
                "SELECT envelope, published FROM daybook_stream_dead_letters"
                " WHERE group_id = %s AND topic = %s",
                (group, topic),
            ).fetchone()
        assert row is not None and bytes(row[0]) == foreign and row[1] is True
        assert the_worker.stop() == 0, the_worker.output
        assert "too large" in the_worker.output, the_worker.output
    finally:
        if the_worker is not None:
            the_worker.stop()
        the_relay.stop()
        ledger.close()


@pytest.fixture
def own_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[services.KafkaHandle]:
    """A broker of this test's own, always (it is stopped and restarted empty), even when
    the session uses an external one."""
    monkeypatch.delenv(services.KAFKA_BOOTSTRAP_ENV, raising=False)
    handle = services.start_kafka(tmp_path / "broker")
    yield handle
    handle.stop()


def test_the_broker_losing_everything_while_stopped_loses_and_repeats_nothing(
    pg_url: str, pg_admin_url: str, own_broker: services.KafkaHandle, tmp_path: Path
) -> None:
    """The broker stopped for a while and restarted empty (memory storage): the relay
    notices, re-publishes the log, the workers restart themselves and finish with the
    in-process runner's tables, every event applied exactly once."""
    kafka = own_broker
    assert not kafka.external
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 30)
    write_money(ledger, accounts, 1000)
    topic, group = unique("restart"), unique("group")
    processes = [
        relay(pg_url, kafka.bootstrap, topic, tmp_path / "relay.log").start(),
        worker(pg_url, kafka.bootstrap, topic, group, tmp_path / "w1.log").start(),
        worker(pg_url, kafka.bootstrap, topic, group, tmp_path / "w2.log").start(),
    ]
    try:
        wait_until(lambda: applied(pg_url, group, topic) == ledger.head(), "the first events")
        kafka.stop()  # memory storage: topics, messages, group offsets all gone
        write_money(ledger, accounts, 500, seed=2)  # committed while the broker is down
        time.sleep(2.0)
        kafka.start()
        write_money(ledger, accounts, 500, seed=3)
        head = ledger.head()
        wait_until(lambda: cursor_position(pg_url, topic) == head, "the relay to catch up")
        wait_until(lambda: applied(pg_url, group, topic) == head, "the workers to catch up")
        restarted = "restarting this worker in place"  # on the relay's signal, between batches
        wait_until(lambda: any(restarted in p.output for p in processes[1:]), "a worker restart")
        cursor = read_cursor(pg_url, topic)
        assert cursor is not None and cursor.republished >= 1
        status = read_status(pg_url, group, topic)
        assert all(p.state == "live" and p.dead_letters == 0 for p in status)
        assert sum(p.applied for p in status) == head  # each event applied once
        assert sum(p.duplicates for p in status) > 0  # the re-published history, skipped
        # The re-published topic reads back whole. (What the relay sent after the restart but
        # before it noticed the loss continues the old chain: a reader starting from nothing
        # holds it back as past a gap, and gets it again in the re-published log.)
        positions, _, _ = follow_chain(read_topic(kafka.bootstrap, topic, PARTITIONS, head))
        assert sorted(positions) == list(range(1, head + 1))
    finally:
        for process in processes:
            assert process.stop() == 0, process.output
    assert tables(pg_url) == reference_tables(pg_url, pg_admin_url)
    ledger.close()


def cursor_position(url: str, topic: str) -> int:
    cursor = read_cursor(url, topic)
    return cursor.position if cursor else 0
