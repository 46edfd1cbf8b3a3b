"""The streaming path observed, against a real PostgreSQL and a real broker: the relay's
published count and lag, and one command's trace through the relay's publish (a child of
the command) to the worker's apply (a child of the publish, by the message's header)."""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from daybook import open_ledger, projections
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.observability import metrics
from daybook.infrastructure.streaming import envelope, faults
from daybook.infrastructure.streaming.app import traceparent_header
from daybook.infrastructure.streaming.progress import read_status
from daybook.infrastructure.streaming.relay import Relay, RelayConfig, read_cursor
from daybook.infrastructure.streaming.worker import Message, StreamApplier
from daybook.projections.accounts import ACCOUNT_BALANCES as BALANCES
from scripts.streams import WAIT, Daybook, open_accounts, unique, wait_until, write_money
from tests.streaming.test_outages import broker_behind_a_proxy

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

PARTITIONS = 2


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def relay_until(relay: Relay, url: str, topic: str, head: int) -> None:
    """Run ``relay`` until its cursor reaches ``head``, then stop it."""
    running = asyncio.ensure_future(relay.run())
    try:
        deadline = asyncio.get_running_loop().time() + WAIT
        while True:
            cursor = await asyncio.to_thread(read_cursor, url, topic)
            if cursor is not None and cursor.position >= head:
                break
            assert not running.done(), relay.health()
            assert asyncio.get_running_loop().time() < deadline, relay.stats
            await asyncio.sleep(0.05)
    finally:
        relay.stop()
        await asyncio.wait_for(running, WAIT)


async def consume(bootstrap: str, topic: str, count: int) -> list[Message]:
    """The first ``count`` events on ``topic`` (marks skipped), as the worker's messages:
    with the ``traceparent`` header, as the faust app reads it."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[Message] = []
    events = 0
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        for p in range(PARTITIONS):
            consumer.seek(TopicPartition(topic, p), 0)
        deadline = asyncio.get_running_loop().time() + WAIT
        while events < count:
            assert asyncio.get_running_loop().time() < deadline, f"{events} of {count} events"
            fetched = await consumer.getmany(timeout_ms=200)
            for tp, records in fetched.items():
                for record in records:
                    assert record.value is not None
                    parent = traceparent_header(record.headers)
                    out.append(Message(tp.partition, record.offset, record.value, parent))
                    events += not envelope.decode(record.value).is_mark
    finally:
        await consumer.stop()
    return out


def test_relay_and_worker_count_and_continue_the_command_trace(
    pg_url: str, kafka_bootstrap: str, spans: InMemorySpanExporter
) -> None:
    ledger = open_ledger(pg_url)
    account = ledger.open_account("ann", "EUR").account_id
    spans.clear()
    receipts = [ledger.deposit(account, amount) for amount in (5, 7, 9)]
    head = ledger.head()
    topic = unique("observed")
    published = value("daybook_relay_published_events_total", topic=topic)
    relay = Relay(
        RelayConfig(pg_url, f"kafka://{kafka_bootstrap}", topic=topic, partitions=PARTITIONS),
        event_log_of(ledger),
    )
    asyncio.run(relay_until(relay, pg_url, topic, head))
    assert value("daybook_relay_published_events_total", topic=topic) == published + head
    assert value("daybook_relay_lag_events", topic=topic) == 0

    labels = {"projection": BALANCES.name, "version": str(BALANCES.version)}
    applied = value("daybook_projection_applied_events_total", **labels)
    converged = value("daybook_convergence_seconds_count", projection=BALANCES.name)
    messages = asyncio.run(consume(kafka_bootstrap, topic, head))
    worker = StreamApplier(
        pg_url, projections.ALL, group=unique("g"), topic=topic, partitions=PARTITIONS,
        writer="test",
    )  # fmt: skip
    try:
        result = worker.apply(messages)
    finally:
        worker.close()
        ledger.close()
    assert result.applied == head
    assert value("daybook_projection_applied_events_total", **labels) == applied + head
    assert value("daybook_convergence_seconds_count", projection=BALANCES.name) == (
        converged + head
    )

    finished = spans.get_finished_spans()
    commands = [s for s in finished if s.name == "command deposit"]
    publishes = {
        s.parent.span_id: s
        for s in finished
        if s.name == "daybook.relay.publish" and s.parent is not None
    }
    applies = {
        s.parent.span_id: s
        for s in finished
        if s.name == "daybook.worker.apply" and s.parent is not None
    }
    assert len(commands) == len(receipts) == 3
    for command, receipt in zip(commands, receipts, strict=True):
        trace_id = command.context.trace_id
        publish = publishes[command.context.span_id]  # the publish: a child of the command
        assert publish.context.trace_id == trace_id
        assert publish.attributes is not None
        assert publish.attributes["daybook.topic"] == topic
        assert publish.attributes["daybook.position.first"] == receipt.position
        apply = applies[publish.context.span_id]  # the apply: a child of the publish
        assert apply.context.trace_id == trace_id
        assert apply.attributes is not None
        assert apply.attributes["daybook.position.first"] == receipt.position
        assert apply.attributes["daybook.events"] == 1


def test_a_message_without_the_header_continues_the_trace_in_its_metadata(
    pg_url: str, spans: InMemorySpanExporter
) -> None:
    """Messages published before the relay set headers still continue the command's trace,
    from the traceparent in the envelope's metadata."""
    from tests.streaming.messages import Stream

    ledger = open_ledger(pg_url)
    account = ledger.open_account("bob", "EUR").account_id
    spans.clear()
    ledger.deposit(account, 3)
    messages = Stream(1).publish(ledger)
    worker = StreamApplier(
        pg_url, projections.ALL, group="g", topic="t", partitions=1, writer="test"
    )
    try:
        worker.apply(messages)
    finally:
        worker.close()
        ledger.close()
    finished = spans.get_finished_spans()
    (command,) = [s for s in finished if s.name == "command deposit"]
    (apply,) = [
        s
        for s in finished
        if s.name == "daybook.worker.apply"
        and s.parent is not None
        and s.parent.span_id == command.context.span_id
    ]
    assert apply.context.trace_id == command.context.trace_id
    assert apply.attributes is not None and apply.attributes["daybook.events"] == 1


def metrics_port(log: Path) -> int | None:
    """The port a process started with ``--metrics-port 0`` says it serves on."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and "metrics_port" in line:
            return int(orjson.loads(line)["metrics_port"])
    return None


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return bytes(answer.read())


def sample(body: bytes, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(body.decode()):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return None


def partition_lags(log: Path, group: str, partitions: int) -> Callable[[], list[float | None]]:
    """Once the worker writing ``log`` says its metrics port: a reading of each partition's
    ``daybook_worker_partition_lag_events`` there (None where it reports none)."""
    wait_until(lambda: metrics_port(log) is not None, "the metrics port")
    port = metrics_port(log)
    assert port is not None

    def lags() -> list[float | None]:
        body = scrape(port)
        name = "daybook_worker_partition_lag_events"
        return [sample(body, name, group=group, partition=str(p)) for p in range(partitions)]

    return lags


@pytest.mark.slow
def test_relay_and_worker_serve_their_metrics_and_log_json(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    ledger = open_ledger(pg_url)
    write_money(ledger, open_accounts(ledger, 10), 300)
    head = ledger.head()
    topic, group = unique("metered"), unique("group")
    common = ["--url", pg_url, "--broker", f"kafka://{kafka_bootstrap}", "--topic", topic]
    common += ["--partitions", str(PARTITIONS), "--metrics-port", "0", "--log-format", "json"]
    relay_log, worker_log = tmp_path / "relay.log", tmp_path / "worker.log"
    relay = Daybook(["relay", *common, "--batch-size", "100"], relay_log).start()
    worker = Daybook(["worker", *common, "--group", group], worker_log).start()
    try:
        wait_until(
            lambda: sum(p.applied for p in read_status(pg_url, group, topic)) == head,
            "every event applied",
        )
        relay_port, worker_port = metrics_port(relay_log), metrics_port(worker_log)
        assert relay_port is not None, relay.output
        assert worker_port is not None, worker.output
        # The worker can apply a batch before the relay has heard the broker's acknowledgement
        # and counted it: wait for the relay's count rather than read it once.
        published = "daybook_relay_published_events_total"
        wait_until(
            lambda: sample(scrape(relay_port), published, topic=topic) == head,
            "the relay's count",
        )
        wait_until(
            lambda: sample(scrape(relay_port), "daybook_relay_lag_events", topic=topic) == 0,
            "the relay's lag to reach 0",
        )
        labels = {"projection": BALANCES.name, "version": str(BALANCES.version)}
        applied_metric = "daybook_projection_applied_events_total"
        wait_until(
            lambda: sample(scrape(worker_port), applied_metric, **labels) == head,
            "the worker's count",
        )
        applied = scrape(worker_port)
        assert sample(applied, "daybook_convergence_seconds_count", projection=BALANCES.name) == (
            head
        )

        def lags() -> list[float | None]:
            body = scrape(worker_port)
            name = "daybook_worker_partition_lag_events"
            return [sample(body, name, group=group, partition=str(p)) for p in range(PARTITIONS)]

        wait_until(lambda: lags() == [0] * PARTITIONS, "every partition's lag: 0")
    finally:
        assert relay.stop() == 0, relay.output
        assert worker.stop() == 0, worker.output
        ledger.close()
    relay_lines = [orjson.loads(line) for line in relay_log.read_text().splitlines()]
    relay_events = [line["event"] for line in relay_lines]
    assert "relay: started" in relay_events
    assert any(e.startswith("relay: caught up") for e in relay_events)
    assert relay_events[-1] == "relay: stopped"
    worker_lines = [orjson.loads(line) for line in worker_log.read_text().splitlines()]
    worker_events = [line["event"] for line in worker_lines]
    assert f"stream worker {group}: started" in worker_events
    assert f"stream worker {group}: stopped" in worker_events
    assert any(e.startswith("worker: partition 0 caught up") for e in worker_events)


def test_a_parked_message_counts_for_every_version_of_the_group(pg_url: str) -> None:
    from tests.streaming.messages import Stream

    ledger = open_ledger(pg_url)
    ledger.deposit(ledger.open_account("cy", "EUR").account_id, 3)
    messages = Stream(1).publish(ledger)
    ledger.close()
    group = unique("g")
    worker = StreamApplier(
        pg_url, projections.ALL, group=group, topic="t", partitions=1, writer="test"
    )
    labels = {"projection": BALANCES.name, "version": str(BALANCES.version)}
    try:
        worker.apply(messages)
        assert value("daybook_projection_parked_events", **labels) == 0
        junk = Message(0, messages[-1].offset + 1, b"not an envelope")
        assert len(worker.apply([junk]).parked) == 1
        assert value("daybook_projection_parked_events", **labels) == 1
    finally:
        worker.close()
    again = StreamApplier(
        pg_url, projections.ALL, group=group, topic="t", partitions=1, writer="other"
    )
    metrics.PROJECTION_PARKED.labels(*labels.values()).set(0)
    try:
        again.apply([Message(0, junk.offset + 1, messages[-1].value)])  # a duplicate
        assert value("daybook_projection_parked_events", **labels) == 1  # read back at start
    finally:
        again.close()


@pytest.mark.slow
def test_a_worker_that_lost_partitions_in_a_rebalance_reports_no_lag_for_them(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Worker A alone holds every partition, each with a backlog (a lag above 0 after each
    batch); worker B joins, takes some of them and applies their backlog to the end. A's
    lag for the partitions it lost goes: it is B's to say (0), not A's last figure."""
    ledger = open_ledger(pg_url)
    write_money(ledger, open_accounts(ledger, 30), 4000)
    head = ledger.head()
    topic, group = unique("lost"), unique("group")
    common = ["--url", pg_url, "--broker", f"kafka://{kafka_bootstrap}", "--topic", topic]
    common += ["--partitions", str(PARTITIONS), "--log-format", "json"]
    lag = "daybook_worker_partition_lag_events"
    relay = Daybook(["relay", *common, "--batch-size", "1000"], tmp_path / "relay.log").start()
    wait_until(lambda: relay_position(pg_url, topic) >= head, "the relay to publish the log")
    # A pauses at the start of its 150th batch of 20 events, with a lag measured for every
    # partition (it drains one before it fetches from the next).
    faults_dir = tmp_path / "faults"
    faults_dir.mkdir()
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    worker_args = ["worker", *common, "--group", group, "--metrics-port", "0"]
    a = Daybook(
        [*worker_args, "--batch-size", "20"],
        a_log,
        env={"DAYBOOK_FAULTS": "worker.batch:150:pause", "DAYBOOK_FAULTS_DIR": str(faults_dir)},
    ).start()
    b: Daybook | None = None
    held = faults.paused_file("worker.batch", faults_dir)
    try:
        wait_until(held.exists, "worker A's 150th batch")
        a_port = metrics_port(a_log)
        assert a_port is not None, a.output
        before = [sample(scrape(a_port), lag, group=group, partition=str(p))
                  for p in range(PARTITIONS)]  # fmt: skip
        # A figure for every partition: whichever B takes, A's would be left stale.
        assert all(v is not None for v in before) and any(v for v in before), before
        b = Daybook([*worker_args, "--batch-size", "500"], b_log).start()
        wait_until(lambda: "Subscribed to topic" in b.output, "worker B to subscribe")
        # Released once the rebalance has begun (A revokes, waiting for its batch), so that B
        # takes partitions with events left: released at once, A could finish them first.
        wait_until(lambda: "Revoking previously assigned" in a.output, "the rebalance")
        held.unlink()  # A goes on, and the group rebalances
        wait_until(
            lambda: sum(p.applied for p in read_status(pg_url, group, topic)) == head,
            "every event applied",
        )
        # B's partitions, as its consumer was given them (it may have had nothing left to
        # apply on one, and then reports no lag for it either).
        wait_until(lambda: assigned_to(b.output, topic), "B's partitions")
        lost = sorted(assigned_to(b.output, topic))

        def stale() -> dict[int, float | None]:
            body = scrape(a_port)
            return {p: sample(body, lag, group=group, partition=str(p)) for p in lost}

        try:
            wait_until(lambda: all(v is None for v in stale().values()), "A to forget them", 15)
        except AssertionError:
            pytest.fail(f"A reports lag for partitions it lost to B: {stale()} ({before})")
    finally:
        held.unlink(missing_ok=True)
        for process in (relay, a, b):
            if process is not None:
                process.stop()
        ledger.close()


def assigned_to(output: str, topic: str) -> set[int]:
    """The partitions of ``topic`` in the last assignment a worker's log shows."""
    lines = [line for line in output.splitlines() if "Setting newly assigned partitions" in line]
    if not lines:
        return set()
    found = re.findall(rf"topic='{re.escape(topic)}', partition=(\d+)", lines[-1])
    return {int(partition) for partition in found}


def relay_position(url: str, topic: str) -> int:
    cursor = read_cursor(url, topic)
    return 0 if cursor is None else cursor.position


@pytest.mark.slow
def test_the_relays_lag_counts_the_events_a_broker_outage_keeps_unpublished(
    pg_url: str, tmp_path: Path
) -> None:
    """The relay caught up (lag 0); the broker goes away and the ledger writes 300 more
    events, which the relay cannot publish: its lag says how many wait, not 0."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 10)
    write_money(ledger, accounts, 100)
    topic = unique("outage")

    def lag() -> float | None:
        return metrics.REGISTRY.get_sample_value("daybook_relay_lag_events", {"topic": topic})

    with broker_behind_a_proxy(tmp_path) as (outage, bootstrap):
        config = RelayConfig(pg_url, f"kafka://{bootstrap}", topic=topic, partitions=1,
                             backoff_max=0.5, request_timeout=1.0)  # fmt: skip
        relay = Relay(config, event_log_of(ledger))
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_until_complete, args=(relay.run(),))
        thread.start()
        try:
            head = ledger.head()
            wait_until(lambda: relay_position(pg_url, topic) == head, "the relay to catch up")
            wait_until(lambda: lag() == 0, "the relay's lag: 0")
            outage.cut()
            write_money(ledger, accounts, 300, seed=2)
            wait_until(lambda: relay.stats.state == "waiting for broker", "the broker outage")
            assert relay_position(pg_url, topic) == head  # nothing more published
            unpublished = ledger.head() - head
            assert unpublished >= 300
            try:
                wait_until(lambda: lag() == unpublished, "the relay's lag to count them", 10)
            except AssertionError:
                pytest.fail(f"the relay's lag says {lag()} with {unpublished} events unpublished")
        finally:
            loop.call_soon_threadsafe(relay.stop)
            thread.join(WAIT)
            loop.close()
            relay.close()
            ledger.close()


def test_a_relay_standing_by_reports_no_lag_for_the_topic(pg_url: str) -> None:
    """The topic's lag is its leader's to say. A relay that stands by (another holds the
    topic's lock), here one that led before in this process, leaves no figure of its own."""
    ledger = open_ledger(pg_url)
    topic = unique("standby")
    metrics.RELAY_LAG_EVENTS.labels(topic).set(42)  # a figure from when it led
    holder = psycopg.connect(pg_url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (f"daybook.relay/{topic}",))
    relay = Relay(RelayConfig(pg_url, "kafka://127.0.0.1:9", topic=topic, poll_interval=0.1),
                  event_log_of(ledger))  # fmt: skip
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(relay.run(),))
    thread.start()
    try:
        wait_until(lambda: relay.stats.state == "standby", "the relay to stand by")
        lag = metrics.REGISTRY.get_sample_value("daybook_relay_lag_events", {"topic": topic})
        assert lag is None, f"a relay standing by reports a lag of {lag}"
    finally:
        loop.call_soon_threadsafe(relay.stop)
        thread.join(WAIT)
        loop.close()
        holder.close()
        ledger.close()
