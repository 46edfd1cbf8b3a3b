"""Two event stores (two databases) whose relays publish to one topic: refused, never mixed.

Log positions and chains mean something only within one event store; a stream group that
took another store's messages would move its checkpoint past its own events."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, RequestTimedOutError

from daybook import open_event_log, open_ledger, projections
from daybook.infrastructure.eventstore.identity import ensure_store_id
from daybook.infrastructure.readmodels.checkpoints import ForeignStore
from daybook.infrastructure.streaming import envelope
from daybook.infrastructure.streaming.broker import ensure_topic
from daybook.infrastructure.streaming.progress import read_dead_letters, read_status
from daybook.infrastructure.streaming.relay import Relay, RelayConfig, read_cursor
from daybook.infrastructure.streaming.worker import Message, StreamApplier
from daybook.infrastructure.transient import is_transient
from scripts import services
from scripts.streams import Daybook, open_accounts, unique, wait_until, write_money
from tests.projections.helpers import workload
from tests.streaming.messages import Stream, of_partitions

pytestmark = pytest.mark.postgres

PARTITIONS = 4


@pytest.fixture
def other_pg_url(pg_server: services.PostgresHandle) -> Iterator[str]:
    """A second fresh database: a second event store."""
    name = f"daybook_test_other_{os.getpid()}"
    url = services.create_database(pg_server.url, name)
    yield url
    services.drop_database(pg_server.url, name)


def store_id(url: str) -> str:
    """The event store's identity, made with its tables."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT store_id FROM daybook_store").fetchone()
    assert row is not None
    return str(row[0])


def test_processes_starting_together_on_a_fresh_database_agree_on_its_identity(
    pg_url: str,
) -> None:
    async def identities() -> list[str]:
        conns = [await psycopg.AsyncConnection.connect(pg_url, autocommit=True) for _ in range(6)]
        try:
            return list(await asyncio.gather(*(ensure_store_id(conn) for conn in conns)))
        finally:
            for conn in conns:
                await conn.close()

    found = asyncio.run(identities())
    assert len(set(found)) == 1, found
    ledger = open_ledger(pg_url)  # the event store's own tables keep it
    ledger.close()
    assert store_id(pg_url) == found[0]


def test_a_worker_refuses_another_stores_messages_and_applies_nothing(
    pg_url: str, other_pg_url: str
) -> None:
    first, second = open_ledger(pg_url), open_ledger(other_pg_url)
    workload(first, 300, seed=1)
    workload(second, 100, seed=2)
    ours = of_partitions(Stream(1, store_id(other_pg_url)).publish(second), 0)
    theirs = of_partitions(Stream(1, store_id(pg_url)).publish(first), 0)
    first.close()
    second.close()
    assert store_id(pg_url) != store_id(other_pg_url)
    worker = StreamApplier(
        other_pg_url, projections.ALL, group="g", topic="t", partitions=1, writer="test"
    )
    try:
        worker.apply(ours[:20])  # the group now follows the second store
        before = read_status(other_pg_url, "g", "t")
        with pytest.raises(ForeignStore) as refused:
            worker.apply([*ours[20:40], *theirs[:50]])
        assert refused.value.code == "foreign_store"
        assert (
            "give each event store (each database, or each schema of one holding a ledger) "
            "its own --topic" in str(refused.value)
        )
        # Nothing of the batch was applied, parked or counted: the position did not jump.
        assert read_status(other_pg_url, "g", "t") == before
        assert read_dead_letters(other_pg_url, "g", "t") == []
        # Its own events go on as before.
        worker.apply(ours[20:])
        last = max(
            e.position for e in map(envelope.decode, (m.value for m in ours)) if not e.is_mark
        )
        status = read_status(other_pg_url, "g", "t")[0]
        assert (status.position, status.duplicates, status.dead_letters) == (last, 0, 0)
    finally:
        worker.close()


def test_messages_naming_no_store_are_applied_as_before(pg_url: str) -> None:
    ledger = open_ledger(pg_url)
    workload(ledger, 100)
    messages = of_partitions(Stream(1).publish(ledger), 0)
    ledger.close()
    worker = StreamApplier(pg_url, projections.ALL, group="g", topic="t", partitions=1, writer="w")
    try:
        assert worker.apply(messages).applied > 0
    finally:
        worker.close()


@pytest.mark.kafka
@pytest.mark.slow
def test_a_relay_refuses_a_topic_another_store_publishes(
    pg_url: str, other_pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique("two-stores")
    first, second = open_ledger(pg_url), open_ledger(other_pg_url)
    write_money(first, open_accounts(first, 10), 200)
    write_money(second, open_accounts(second, 10), 100, seed=2)
    head = first.head()
    first.close()
    second.close()

    def relay(url: str, log: str) -> Daybook:
        args = ["relay", "--url", url, "--broker", f"kafka://{kafka_bootstrap}"]
        args += ["--topic", topic, "--partitions", str(PARTITIONS), "--poll-interval", "0.2"]
        return Daybook([*args, "-v"], tmp_path / log)

    publishing = relay(pg_url, "first.log").start()
    try:
        wait_until(
            lambda: (c := read_cursor(pg_url, topic)) is not None and c.position == head,
            "the first store's relay to publish its log",
        )
        refused = relay(other_pg_url, "second.log").start()
        assert refused.wait() == 1, refused.output
        assert "topic_of_another_store" in refused.output
        assert (
            "give each event store (each database, or each schema of one holding a ledger) "
            "its own --topic" in refused.output
        )
        cursor = read_cursor(other_pg_url, topic)
        assert cursor is None or cursor.position == 0  # published nothing
    finally:
        assert publishing.stop() == 0, publishing.output


def produce(bootstrap: str, topic: str, messages: Sequence[Message]) -> None:
    """Put ``messages`` on ``topic`` as a relay would (each to its partition)."""

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for message in messages:
                await producer.send_and_wait(topic, message.value, partition=message.partition)
        finally:
            await producer.stop()

    asyncio.run(send())


@pytest.mark.kafka
@pytest.mark.slow
def test_a_worker_meeting_another_stores_events_on_its_topic_stops_having_applied_nothing(
    pg_url: str, other_pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic, group = unique("two-stores"), unique("group")
    first, second = open_ledger(pg_url), open_ledger(other_pg_url)
    write_money(first, open_accounts(first, 10), 300)
    write_money(second, open_accounts(second, 10), 100, seed=2)
    head = second.head()
    second.close()
    broker = ["--broker", f"kafka://{kafka_bootstrap}", "--topic", topic]
    broker += ["--partitions", str(PARTITIONS)]
    publishing = Daybook(
        ["relay", "--url", other_pg_url, *broker, "--poll-interval", "0.2", "-v"],
        tmp_path / "relay.log",
    ).start()
    consuming = Daybook(
        ["worker", "--url", other_pg_url, *broker, "--group", group, "-v"],
        tmp_path / "worker.log",
    ).start()
    try:
        wait_until(
            lambda: sum(p.applied for p in read_status(other_pg_url, group, topic)) == head,
            "the worker to apply its own store's log",
        )
        before = read_status(other_pg_url, group, topic)
        # The first store's events, as its relay publishes them, on the same topic.
        produce(kafka_bootstrap, topic, Stream(PARTITIONS, store_id(pg_url)).publish(first))
        assert consuming.wait() == 1, consuming.output
        assert "foreign_store" in consuming.output, consuming.output
        assert (
            "give each event store (each database, or each schema of one holding a ledger) "
            "its own --topic" in consuming.output
        )
        assert read_status(other_pg_url, group, topic) == before  # no jump, nothing counted
        assert read_dead_letters(other_pg_url, group, topic) == []
    finally:
        first.close()
        consuming.stop()
        assert publishing.stop() == 0, publishing.output


def _checking_relay(pg_url: str, bootstrap: str, topic: str) -> Relay:
    """A relay of ``pg_url`` ready to check ``topic`` (as it does once it leads)."""
    config = RelayConfig(
        store_url=pg_url,
        broker_url=f"kafka://{bootstrap}",
        topic=topic,
        partitions=PARTITIONS,
        request_timeout=2.0,
    )
    relay = Relay(config, open_event_log(pg_url), owns_log=True)
    relay._store_id = store_id(pg_url)
    return relay


@pytest.mark.kafka
def test_a_topic_whose_last_messages_cannot_be_read_in_time_is_not_passed_as_checked(
    pg_url: str, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that does not hand over a partition's last message within the relay's
    request timeout leaves the topic unchecked: an outage to wait out, not a pass."""
    open_ledger(pg_url).close()
    topic = unique("slow-check")
    assert asyncio.run(ensure_topic(kafka_bootstrap, topic, PARTITIONS)) == PARTITIONS
    produce(kafka_bootstrap, topic, [Message(2, 0, b"another store's message")])

    async def nothing(self: AIOKafkaConsumer, *partitions: Any, **_: Any) -> dict[Any, Any]:
        await asyncio.sleep(0.05)
        return {}

    monkeypatch.setattr(AIOKafkaConsumer, "getmany", nothing)
    relay = _checking_relay(pg_url, kafka_bootstrap, topic)
    try:
        with pytest.raises(RequestTimedOutError, match="partition\\(s\\) 2 of topic") as unread:
            asyncio.run(relay._refuse_another_store())
        assert is_transient(unread.value)
    finally:
        relay.close()


def test_a_topic_check_that_cannot_reach_the_broker_leaves_no_consumer_open(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_ledger(pg_url).close()
    started: list[int] = []
    stopped: list[int] = []
    start, stop = AIOKafkaConsumer.start, AIOKafkaConsumer.stop

    async def recorded_start(self: AIOKafkaConsumer) -> None:
        started.append(id(self))
        await start(self)

    async def recorded_stop(self: AIOKafkaConsumer) -> None:
        stopped.append(id(self))
        await stop(self)

    monkeypatch.setattr(AIOKafkaConsumer, "start", recorded_start)
    monkeypatch.setattr(AIOKafkaConsumer, "stop", recorded_stop)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{sock.getsockname()[1]}"
    relay = _checking_relay(pg_url, nobody, unique("no-broker"))
    try:
        with pytest.raises(KafkaConnectionError):
            asyncio.run(relay._refuse_another_store())
        assert started and stopped == started  # a consumer whose start failed is closed too
    finally:
        relay.close()
