"""The faust-streaming and aiokafka internals daybook relies on are still there, as expected.

Every name a compat module lists in ``RELIED_ON`` is checked against the installed library;
names that ``__init__`` sets are checked on unstarted instances (no broker needed).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiokafka
import aiokafka.partitioner
import faust
import faust.transport.consumer
import httpcore
import httpx
import pytest
from aiokafka.producer.message_accumulator import MessageBatch
from aiokafka.structs import TopicPartition
from eventsourcing.application import LRUCache
from eventsourcing.popo import POPOApplicationRecorder
from eventsourcing.postgres import PostgresDatastore, PostgresRecorder
from eventsourcing.sqlite import SQLiteConnectionPool
from faust.types import Message
from prometheus_client import CollectorRegistry, Histogram
from psycopg_pool.base import AttemptWithBackoff

from daybook.domain.accounts import Account
from daybook.infrastructure.compat import Internal
from daybook.infrastructure.compat import aiokafka as aiokafka_compat
from daybook.infrastructure.compat import eventsourcing as eventsourcing_compat
from daybook.infrastructure.compat import faust as faust_compat
from daybook.infrastructure.compat import httpx as httpx_compat
from daybook.infrastructure.compat import opentelemetry as opentelemetry_compat
from daybook.infrastructure.compat import prometheus_client as prometheus_compat

COMPAT_MODULES = {
    "faust": faust_compat,
    "aiokafka": aiokafka_compat,
    "eventsourcing": eventsourcing_compat,
    "opentelemetry": opentelemetry_compat,
    "prometheus_client": prometheus_compat,
    "httpx": httpx_compat,
}


def unstarted_kafka_producer() -> Any:
    """An ``AIOKafkaProducer`` that never connects (its constructor wants a running loop)."""

    async def build() -> Any:
        producer = aiokafka.AIOKafkaProducer(bootstrap_servers="127.0.0.1:9")
        await producer.stop()  # closed (else it warns, unclosed); it keeps its parts
        return producer

    return asyncio.run(build())


def unsent_kafka_batch() -> Any:
    """An aiokafka ``MessageBatch`` of nothing (its futures want a running loop)."""

    async def build() -> Any:
        return MessageBatch(TopicPartition("t", 0), None, 1.0, 0)

    return asyncio.run(build())


def unstarted_kafka_consumer() -> Any:
    """An ``AIOKafkaConsumer`` that never connects (its constructor wants a running loop)."""

    async def build() -> Any:
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9")
        await consumer.stop()
        return consumer

    return asyncio.run(build())


@pytest.fixture
def faust_app(tmp_path: Path) -> Iterator[faust.App]:
    """A worker app as ``make_app`` configures one, never started."""
    loop = asyncio.new_event_loop()
    app = faust.App(
        "daybook-compat-check",
        broker="kafka://127.0.0.1:9",
        store="memory://",
        datadir=str(tmp_path),
        processing_guarantee="at_least_once",
        broker_commit_every=100,
        loop=loop,
    )
    yield app
    # The consumer's thread has an event loop of its own; neither ever ran.
    consumer: Any = app.consumer
    consumer._thread.thread_loop.close()
    loop.close()


@pytest.fixture
def instances(faust_app: faust.App) -> Iterator[dict[str, object]]:
    """Unstarted instances of the owners whose names are set by ``__init__`` (a PostgreSQL
    datastore whose pool never connects: nothing listens on port 9)."""
    datastore = PostgresDatastore("x", "127.0.0.1", 9, "nobody", "")
    producer = unstarted_kafka_producer()
    yield {
        "faust.transport.drivers.aiokafka:Consumer": faust_app.consumer,
        "faust.sensors.monitor:Monitor": faust_app.monitor,
        "aiokafka:AIOKafkaConsumer": unstarted_kafka_consumer(),
        "aiokafka:AIOKafkaProducer": producer,
        "aiokafka.producer.message_accumulator:MessageAccumulator": producer._message_accumulator,
        "aiokafka.producer.message_accumulator:MessageBatch": unsent_kafka_batch(),
        "eventsourcing.popo:POPOApplicationRecorder": POPOApplicationRecorder(),
        "eventsourcing.postgres:PostgresDatastore": datastore,
        "psycopg_pool:ConnectionPool": datastore.pool,
        "psycopg_pool.base:AttemptWithBackoff": AttemptWithBackoff(timeout=1.0),
        "eventsourcing.postgres:PostgresRecorder": PostgresRecorder(datastore),
        "eventsourcing.application:LRUCache": LRUCache(maxsize=10),
        "eventsourcing.sqlite:SQLiteConnectionPool": SQLiteConnectionPool(db_name=":memory:"),
        "daybook.domain.accounts:Account": Account.open(uuid4(), "ann", "EUR", 0),
        "prometheus_client.metrics:Histogram": Histogram("x", "y", registry=CollectorRegistry()),
        "httpx:HTTPTransport": httpx.HTTPTransport(),
        "httpx:Client": httpx.Client(),
        "httpcore:ConnectionPool": httpcore.ConnectionPool(),
    }
    datastore.close()


def relied_on(module: Any) -> list[Any]:
    return [pytest.param(internal, id=internal.label) for internal in module.RELIED_ON]


def check(internal: Internal, instances: dict[str, object]) -> None:
    instance = instances[internal.owner] if internal.on_instance else None
    problem = internal.problem(instance)
    if problem is not None:
        pytest.fail(problem, pytrace=False)


@pytest.mark.parametrize("internal", relied_on(faust_compat))
def test_faust_streaming_still_has(internal: Internal, instances: dict[str, object]) -> None:
    check(internal, instances)


@pytest.mark.parametrize("internal", relied_on(aiokafka_compat))
def test_aiokafka_still_has(internal: Internal, instances: dict[str, object]) -> None:
    check(internal, instances)


@pytest.mark.parametrize("internal", relied_on(eventsourcing_compat))
def test_eventsourcing_still_has(internal: Internal, instances: dict[str, object]) -> None:
    check(internal, instances)


@pytest.mark.parametrize("internal", relied_on(opentelemetry_compat))
def test_opentelemetry_api_still_has(internal: Internal, instances: dict[str, object]) -> None:
    check(internal, instances)


@pytest.mark.parametrize("internal", relied_on(prometheus_compat))
def test_prometheus_client_still_has(internal: Internal, instances: dict[str, object]) -> None:
    check(internal, instances)


@pytest.mark.parametrize("internal", relied_on(httpx_compat))
def test_httpx_and_httpcore_still_have(internal: Internal, instances: dict[str, object]) -> None:
    check(internal, instances)


def test_a_transport_with_deadlines_opens_its_connections_through_daybooks_backend() -> None:
    transport = httpx_compat.with_deadlines(httpx.HTTPTransport())
    assert isinstance(transport._pool._network_backend, httpx_compat._Backend)
    # Twice is once: not a backend wrapped in itself.
    again = httpx_compat.with_deadlines(transport)
    assert not isinstance(again._pool._network_backend._backend, httpx_compat._Backend)


def test_a_renamed_eventsourcing_hook_is_named_with_what_relies_on_it(
    monkeypatch: pytest.MonkeyPatch, instances: dict[str, object]
) -> None:
    from eventsourcing.sqlite import SQLiteAggregateRecorder, SQLiteApplicationRecorder

    monkeypatch.delattr(SQLiteApplicationRecorder, "_insert_events")
    monkeypatch.delattr(SQLiteAggregateRecorder, "_insert_events")
    problem = problem_of(eventsourcing_compat, "_insert_events", instances, "sqlite")
    assert problem is not None and problem.startswith(
        "eventsourcing no longer has SQLiteApplicationRecorder._insert_events, which "
    )


def private_names_used(module: Any) -> set[str]:
    """``x._name`` read or set in a module's code (not ``self._name``, not in strings)."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    }


@pytest.mark.parametrize("library", sorted(COMPAT_MODULES))
def test_every_private_name_a_compat_module_uses_is_listed(library: str) -> None:
    module = COMPAT_MODULES[library]
    listed = {internal.name for internal in module.RELIED_ON}
    assert private_names_used(module) - listed == set()


# -- the check itself fails, and says what to look at --------------------------------------


def problem_of(module: Any, name: str, instances: dict[str, object], owner: str = "") -> str | None:
    (internal,) = [i for i in module.RELIED_ON if i.name == name and owner in i.owner]
    return internal.problem(instances[internal.owner] if internal.on_instance else None)


def test_a_removed_method_is_named_with_what_relies_on_it(
    monkeypatch: pytest.MonkeyPatch, instances: dict[str, object]
) -> None:
    monkeypatch.delattr(faust.transport.consumer.Consumer, "_add_gap")
    assert problem_of(faust_compat, "_add_gap", instances) == (
        "faust-streaming no longer has Consumer._add_gap, which "
        "daybook.infrastructure.compat.faust.drain_in_batches relies on; check the new "
        "faust version's fetch loop (Consumer._drain_messages)"
    )


def test_a_removed_instance_attribute_is_named(
    monkeypatch: pytest.MonkeyPatch, instances: dict[str, object]
) -> None:
    consumer = instances["faust.transport.drivers.aiokafka:Consumer"]
    monkeypatch.delattr(consumer, "_read_offset")
    problem = problem_of(faust_compat, "_read_offset", instances)
    assert problem is not None
    assert problem.startswith("faust-streaming no longer has Consumer._read_offset, which ")


def test_a_removed_module_function_is_named(
    monkeypatch: pytest.MonkeyPatch, instances: dict[str, object]
) -> None:
    monkeypatch.delattr(aiokafka.partitioner, "murmur2")
    assert problem_of(aiokafka_compat, "murmur2", instances) == (
        "aiokafka no longer has aiokafka.partitioner.murmur2, which "
        "daybook.infrastructure.compat.aiokafka.default_partition relies on; check aiokafka's "
        "DefaultPartitioner (it must still hash keys as the Java client does)"
    )


def test_a_reshaped_method_is_named(
    monkeypatch: pytest.MonkeyPatch, instances: dict[str, object]
) -> None:
    def add_gap(self: object, tp: object, offset_from: int, offset_to: int) -> None: ...

    async def add_gaps(self: object, tp: object, gaps: list[tuple[int, int]]) -> None: ...

    consumer_class = faust.transport.consumer.Consumer
    monkeypatch.setattr(consumer_class, "_add_gap", add_gap)
    problem = problem_of(faust_compat, "_add_gap", instances)
    assert problem is not None
    assert "changed Consumer._add_gap: it is not a coroutine function" in problem
    monkeypatch.setattr(consumer_class, "_add_gap", add_gaps)
    problem = problem_of(faust_compat, "_add_gap", instances)
    assert problem is not None
    assert "it takes (tp, gaps), not (tp, offset_from, offset_to, ...)" in problem


def test_a_value_of_another_type_is_named(
    monkeypatch: pytest.MonkeyPatch, instances: dict[str, object]
) -> None:
    monkeypatch.setattr(instances["faust.transport.drivers.aiokafka:Consumer"], "_n_acked", "0")
    problem = problem_of(faust_compat, "_n_acked", instances)
    assert problem is not None
    assert "changed Consumer._n_acked: it is a str, not int" in problem


def test_a_setting_the_library_stopped_reading_is_named(
    monkeypatch: pytest.MonkeyPatch, instances: dict[str, object]
) -> None:
    async def start(self: object) -> None:  # reads nothing daybook sets
        pass

    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "start", start)
    problem = problem_of(aiokafka_compat, "_fetch_max_wait_ms", instances)
    assert problem is not None
    assert (
        "aiokafka no longer uses AIOKafkaConsumer._fetch_max_wait_ms in "
        "aiokafka.AIOKafkaConsumer.start, which "
        "daybook.infrastructure.compat.aiokafka.set_fetch_max_wait relies on"
    ) in problem


def test_a_missing_owner_is_named() -> None:
    internal = Internal(
        "faust-streaming", "faust.transport.consumer:Gone", "x", faust_compat.untrack, "it"
    )
    assert internal.problem() == (
        "faust-streaming no longer has faust.transport.consumer.Gone, which "
        "daybook.infrastructure.compat.faust.untrack relies on; check it"
    )


# -- what the compat functions do -------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "partition"),
    # Partitions of 1,000 that Kafka's Java client picks (org.apache.kafka Utils.murmur2).
    [(b"", 681), (b"a", 524), (b"ab", 434), (b"abc", 107), (b"123456789", 566), (b"\x00 ", 742)],
)
def test_default_partition_is_the_java_clients(key: bytes, partition: int) -> None:
    assert aiokafka_compat.default_partition(key, 1000) == partition


def test_set_fetch_max_wait_sets_what_the_consumer_starts_with() -> None:
    consumer = unstarted_kafka_consumer()
    aiokafka_compat.set_fetch_max_wait(consumer, 0.05)
    assert consumer._fetch_max_wait_ms == 50


def test_customize_worker_consumer_sees_the_consumer_faust_builds(faust_app: faust.App) -> None:
    seen: list[Any] = []
    faust_compat.customize_worker_consumer(faust_app, seen.append)
    consumer: Any = faust_app.consumer

    async def build() -> Any:
        built = consumer._thread._create_worker_consumer(consumer.transport)
        await built.stop()
        return built

    built = asyncio.run(build())
    assert seen == [built]
    assert isinstance(built, aiokafka.AIOKafkaConsumer)


def a_message(offset: int) -> Message:
    return Message("daybook.events", 0, offset, 0.0, 0, None, b"k", b"v", None)


def test_untrack_drops_tracked_messages_without_acknowledging_them(faust_app: faust.App) -> None:
    consumer = faust_app.consumer
    messages = [a_message(offset) for offset in range(3)]
    for message in messages:
        consumer.track_message(message)
    faust_compat.untrack(faust_app, messages[:2])
    assert set(consumer.unacked) == {messages[2]}
    assert not any(message.acked for message in messages)
    faust_compat.untrack(faust_app, messages[2:])


def test_drain_in_batches_replaces_the_fetch_loop_with_one_faust_can_call(
    faust_app: faust.App,
) -> None:
    handoff: asyncio.Queue[list[Message]] = asyncio.Queue(maxsize=2)
    faust_compat.drain_in_batches(faust_app, "daybook.events", handoff)
    consumer: Any = faust_app.consumer
    drain = consumer._drain_messages
    assert inspect.iscoroutinefunction(drain)
    assert list(inspect.signature(drain).parameters) == ["fetcher"]


def test_the_postgres_recorder_daybook_extends_creates_tables_as_its_base_does() -> None:
    """daybook's PostgreSQL recorder runs ``sql_create_statements`` itself, one transaction
    each, instead of calling eventsourcing's ``create_table``; that is the whole of what it
    replaces only while no class between it and ``PostgresRecorder`` overrides the method."""
    from eventsourcing.postgres import PostgresAggregateRecorder, PostgresApplicationRecorder

    for recorder in (PostgresAggregateRecorder, PostgresApplicationRecorder):
        assert recorder.create_table is PostgresRecorder.create_table, (
            f"eventsourcing's {recorder.__name__} now creates its tables its own way: check "
            "daybook.infrastructure.eventstore.postgres.PostgresRecorder.create_table"
        )
