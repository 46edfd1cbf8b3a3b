"""Relay -> Kafka -> faust workers -> read models, checked against the in-process runner."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from daybook import open_ledger
from daybook.infrastructure.bootstrap import event_log_of
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.readmodels.runner import ProjectionRunner
from daybook.infrastructure.streaming import faults
from daybook.infrastructure.streaming.app import DATADIR_PREFIX, remove_dead_workers_datadirs
from daybook.infrastructure.streaming.broker import ensure_topic
from daybook.infrastructure.streaming.progress import read_status
from daybook.infrastructure.streaming.relay import read_cursor
from daybook.infrastructure.streaming.worker import StreamApplier
from daybook.projections import ALL
from daybook.projections.accounts import ACCOUNT_BALANCES
from daybook.projections.model import Projection
from scripts import services
from scripts.streams import (
    Daybook,
    open_accounts,
    unique,
    wait_until,
    write_money,
)
from tests.streaming.messages import Stream

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]

PARTITIONS = 4


def applied_before(
    readmodels: str,
    ledger: Any,
    projections: Sequence[Projection],
    group: str,
    topic: str,
    partitions: int = PARTITIONS,
) -> None:
    """``ledger``'s log applied for ``group`` (its versions registered, its progress rows
    written) by an earlier worker of it, as a worker does, though never put on ``topic``.
    Returns once that worker is gone."""
    applier = StreamApplier(readmodels, projections, group=group, topic=topic,
                            partitions=partitions, writer="before")  # fmt: skip
    try:
        applier.apply(Stream(partitions).publish(ledger))
    finally:
        applier.close()


def relay(url: str, bootstrap: str, topic: str, log: Path) -> Daybook:
    args = ["relay", "--url", url, "--broker", f"kafka://{bootstrap}", "--topic", topic]
    args += ["--partitions", str(PARTITIONS), "--batch-size", "1000", "--poll-interval", "0.2"]
    return Daybook([*args, "-v"], log)


def worker(
    url: str,
    bootstrap: str,
    topic: str,
    group: str,
    log: Path,
    faults: str = "",
    batch: int = 500,
    tmpdir: Path | None = None,
) -> Daybook:
    args = ["worker", "--url", url, "--broker", f"kafka://{bootstrap}", "--topic", topic]
    args += ["--partitions", str(PARTITIONS), "--group", group, "--batch-size", str(batch), "-v"]
    env = {"DAYBOOK_FAULTS": faults} if faults else {}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)  # its faust data directory goes there
    return Daybook(args, log, env=env)


def assignments(output: str, topic: str) -> list[bool]:
    """Each partition assignment logged in a worker's ``output`` (aiokafka's line, through
    daybook's handler), in order: whether it gave the worker partitions of ``topic``. Only
    the sets after "Setting newly assigned partitions" count: the same set follows
    "Revoking previously assigned partitions", and the subscription names the topic,
    without partitions."""
    assigned = output.split("Setting newly assigned partitions")[1:]
    sets = [after.partition(" for group ")[0] for after in assigned]
    return [f"TopicPartition(topic={topic!r}, partition=" in s for s in sets]


def holds_partitions(worker: Daybook, topic: str) -> bool:
    """Whether the latest assignment gave the worker partitions of ``topic``."""
    given = assignments(worker.output, topic)
    return bool(given) and given[-1]


_COORDINATOR = "2026-12-04 07:34:10,124 INFO aiokafka.consumer.group_coordinator"

#: A worker's subscription as it is logged: the topic's name, without partitions.
_SUBSCRIBED = (
    "2026-12-04 07:33:58,987 INFO aiokafka.consumer.consumer Subscribed to topic(s): "
    "{'orders', 'group-6f987325-__assignor-__leader'}\n"
)

#: Then a rebalance that revokes the partitions of ``orders`` it had and gives it none.
_REVOKED_ONLY = _SUBSCRIBED + (
    f"{_COORDINATOR} Revoking previously assigned partitions "
    "frozenset({TopicPartition(topic='orders', partition=2), "
    "TopicPartition(topic='group-6f987325-__assignor-__leader', partition=0), "
    "TopicPartition(topic='orders', partition=3)}) for group group-6f987325\n"
    f"{_COORDINATOR} Setting newly assigned partitions set() for group group-6f987325\n"
)

#: Or an assignment of partitions of ``orders``.
_ASSIGNED = _SUBSCRIBED + (
    f"{_COORDINATOR} Setting newly assigned partitions "
    "{TopicPartition(topic='orders', partition=2), "
    "TopicPartition(topic='group-6f987325-__assignor-__leader', partition=0), "
    "TopicPartition(topic='orders', partition=3)} for group group-6f987325\n"
)


def test_a_worker_holds_the_partitions_it_was_assigned_not_those_revoked(
    tmp_path: Path,
) -> None:
    """The same set is logged when partitions are revoked as when they are assigned: a
    worker whose partitions were revoked, and that was given none, holds none."""
    log = tmp_path / "w.log"
    process = Daybook(["worker"], log)
    log.write_text(_REVOKED_ONLY)
    assert not holds_partitions(process, "orders")
    log.write_text(_ASSIGNED)
    assert holds_partitions(process, "orders")
    assert not holds_partitions(process, "order")


def applied(url: str, group: str, topic: str) -> int:
    return sum(p.applied for p in read_status(url, group, topic))


def tables(url: str) -> dict[str, list[dict[str, object]]]:
    store = open_store(url)
    try:
        out = {}
        for projection in ALL:
            for table in projection.tables:
                rows = list(store.all_rows(table, projection.version))
                out[table.name] = sorted(rows, key=lambda r: [str(r[k]) for k in table.key])
        return out
    finally:
        store.close()


def reference_tables(url: str, pg_admin_url: str) -> dict[str, list[dict[str, object]]]:
    """The same log projected by the in-process runner into a database of its own."""
    name = unique("daybook_ref").replace("-", "_")
    other = services.create_database(pg_admin_url, name)
    ledger = open_ledger(url)
    try:
        runner = ProjectionRunner(event_log_of(ledger), other, ALL, batch_size=5000)
        runner.run_until_caught_up()
        runner.stop()
        return tables(other)
    finally:
        ledger.close()
        services.drop_database(pg_admin_url, name)


def test_two_workers_build_the_same_tables_as_the_in_process_runner(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 30)
    write_money(ledger, accounts, 2000)
    topic, group = unique("e2e"), unique("group")
    processes = [
        relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log").start(),
        worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "w1.log").start(),
        worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "w2.log").start(),
    ]
    try:
        # Both workers hold partitions before the rest of the log is written: a worker that
        # started seconds after the other (a loaded machine) could otherwise find the first
        # one done with everything.
        for process in processes[1:]:
            wait_until(lambda p=process: holds_partitions(p, topic), "both to get partitions")
        write_money(ledger, accounts, 1000, seed=2)  # while everything runs
        head = ledger.head()
        wait_until(lambda: applied(pg_url, group, topic) == head, "every event applied")
        status = read_status(pg_url, group, topic)
        assert all(p.state == "live" and p.dead_letters == 0 for p in status)
        # Each worker wrote the partitions the group gave it (both got some).
        writers = {p.writer.rsplit(":", 1)[0] for p in status if p.writer}
        assert writers == {f"{socket.gethostname()}:{w.proc.pid}" for w in processes[1:] if w.proc}
        assert len({p.writer for p in status}) == 2  # one name per worker
    finally:
        for process in processes:
            process.stop()
    assert tables(pg_url) == reference_tables(pg_url, pg_admin_url)
    ledger.close()


def test_a_killed_worker_and_workers_joining_and_leaving_lose_and_repeat_nothing(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 30)
    write_money(ledger, accounts, 1500)
    topic, group = unique("faults"), unique("group")
    the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log").start()
    # Killed (SIGKILL, from inside) right after its second batch committed, before faust
    # could acknowledge it: that batch is delivered again, to the worker that takes over.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    doomed = worker(
        pg_url,
        kafka_bootstrap,
        topic,
        group,
        tmp_path / "w1.log",
        faults="worker.after_commit:2",
        tmpdir=scratch,
    ).start()
    assert doomed.wait() == -9, doomed.output
    assert "fault point worker.after_commit: SIGKILL" in doomed.output
    # Killed outright, it left its faust data directory; the next worker to start removes it.
    (left,) = scratch.glob("daybook-faust-*")
    steady = worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "w2.log", tmpdir=scratch)
    steady.start()
    extra: Daybook | None = None
    try:
        wait_until(lambda: applied(pg_url, group, topic) == ledger.head(), "the takeover")
        assert not left.exists() and len(list(scratch.glob("daybook-faust-*"))) == 1
        extra = worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "w3.log").start()
        write_money(ledger, accounts, 1500, seed=3)  # while the group rebalances
        wait_until(lambda: holds_partitions(extra, topic), "the new worker to get partitions")
        wait_until(lambda: applied(pg_url, group, topic) == ledger.head(), "two workers")
        assert extra.stop() == 0, extra.output  # a worker leaves
        write_money(ledger, accounts, 1500, seed=4)
        wait_until(lambda: applied(pg_url, group, topic) == ledger.head(), "the last worker")
        status = read_status(pg_url, group, topic)
        assert sum(p.duplicates for p in status) > 0  # redelivered, recognised, skipped
        assert all(p.state == "live" for p in status)
    finally:
        for process in (the_relay, steady, extra):
            if process is not None:
                process.stop()
    assert "fault point" not in steady.output
    assert tables(pg_url) == reference_tables(pg_url, pg_admin_url)
    ledger.close()


def test_only_the_data_directories_of_ended_workers_are_removed(tmp_path: Path) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    dead = tmp_path / f"{DATADIR_PREFIX}{int(ended.stdout)}-x1"
    alive = tmp_path / f"{DATADIR_PREFIX}{os.getpid()}-x2"
    unnamed = tmp_path / f"{DATADIR_PREFIX}abc-x3"  # not a worker's name: left alone
    for path in (dead, alive, unnamed):
        (path / "v1").mkdir(parents=True)
    assert remove_dead_workers_datadirs(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and unnamed.exists()


def test_a_failure_no_retry_cures_stops_the_worker_with_its_reason(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A progress table of the wrong shape (an undefined column is not an outage): the
    worker must not retry forever or die silently; it stops, says why, and exits 1."""
    topic, group = unique("broken"), unique("group")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE daybook_stream_progress (something_else text)")
    asyncio.run(produce(kafka_bootstrap, topic, [b"any message makes the worker apply"]))
    process = worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "worker.log").start()
    try:
        assert process.wait() == 1, process.output
    finally:
        process.stop()
    assert "daybook worker: stopped: UndefinedColumn" in process.output
    assert f"stream worker {group} failed and stopped: UndefinedColumn" in process.output


def test_a_worker_refused_by_a_users_mistake_says_why_in_one_line_without_a_traceback(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Workers started with projection versions new to a group that has applied events
    (group_already_started) stop with exit 1 and the refusal's code and advice: the user's
    to fix, so no traceback, which is for bugs. They say so at start: on a quiet topic no
    batch would ever come to say it."""
    topic, group = unique("refused"), unique("group")
    ledger = open_ledger(pg_url)
    open_accounts(ledger, 3)
    try:
        applied_before(pg_url, ledger, [ACCOUNT_BALANCES], group, topic)
    finally:
        ledger.close()
    output = refused_at_start(pg_url, kafka_bootstrap, topic, group, tmp_path)
    assert "group_already_started" in output and "new --group" in output


def test_a_worker_whose_group_owns_none_of_its_versions_stops_at_start(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Every version built and kept by the in-process runner: a worker has nothing to
    write, says whose they are and how to hand them over, and exits 1, with no event on
    its topic to make it apply a batch first."""
    topic, group = unique("unowned"), unique("group")
    ledger = open_ledger(pg_url)
    try:
        open_accounts(ledger, 3)
        runner = ProjectionRunner(event_log_of(ledger), pg_url, ALL)
        runner.run_until_caught_up()
        runner.stop()
    finally:
        ledger.close()
    output = refused_at_start(pg_url, kafka_bootstrap, topic, group, tmp_path)
    assert "not_owner" in output and "projections handover" in output


def test_a_worker_with_another_partition_count_than_its_topic_on_the_broker_stops_at_start(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """faust leaves a topic that exists as it is, whatever partition count it was told;
    Kafka then hands the group the topic's partitions. With no relay cursor to compare with
    (the relay not run yet, or its event store elsewhere), the broker's count is what says
    the worker's --partitions is wrong: it stops at start, naming both counts."""
    topic, group = unique("two"), unique("group")
    assert asyncio.run(ensure_topic(kafka_bootstrap, topic, 2)) == 2
    open_ledger(pg_url).close()
    output = refused_at_start(pg_url, kafka_bootstrap, topic, group, tmp_path)
    assert "partitioning_mismatch" in output, output
    assert f"the broker has topic '{topic}' with 2 partitions" in output
    assert f"runs with {PARTITIONS}: start it with --partitions 2" in output


def refused_at_start(pg_url: str, bootstrap: str, topic: str, group: str, tmp_path: Path) -> str:
    """The output of a worker that exits 1, refused (no event is on its topic), without a
    traceback: a user's mistake, not a bug."""
    process = worker(pg_url, bootstrap, topic, group, tmp_path / "worker.log").start()
    try:
        assert process.wait() == 1, process.output
    finally:
        process.stop()
    assert "Traceback" not in process.output, process.output
    return process.output


#: faust's stream-processing timeout for the tests below, in seconds (five minutes by
#: default), set as faust reads it: from the environment.
LIVELOCK_TIMEOUT = 5.0
#: How often faust's livelock check runs: 2.5 commit intervals (``WorkerConfig``'s 0.5 s).
LIVELOCK_CHECK_INTERVAL = 2.5 * 0.5


def test_a_worker_keeping_up_with_a_steady_load_reports_no_stalled_stream(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """faust's livelock check says a partition's stream has not started, or stopped,
    processing when the broker has messages beyond the consumer's position and no event of
    that partition entered a faust stream for ``stream_processing_timeout``. The worker
    applies whole fetches without a faust stream: while it keeps up with a steady load
    (small batches, so that fetched messages often wait their turn), faust must not call its
    partitions unstarted (it did, at ERROR, every few checks). Only that line is looked
    for: a batch slowed past the timeout by a busy machine is reported slow, and rightly."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 10)
    topic, group = unique("steady"), unique("group")
    the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log").start()
    process = worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "worker.log", batch=50)
    process.env["STREAM_PROCESSING_TIMEOUT"] = str(LIVELOCK_TIMEOUT)
    process.start()
    try:
        wait_until(lambda: holds_partitions(process, topic), "the worker to get partitions")
        wait_until(lambda: applied(pg_url, group, topic) == ledger.head(), "the first events")
        # The load lasts past the timeout and several checks after it; each step's events
        # are applied before the next step's are written.
        until = time.monotonic() + LIVELOCK_TIMEOUT + 8 * LIVELOCK_CHECK_INTERVAL
        step = 0
        while time.monotonic() < until:
            step += 1
            write_money(ledger, accounts, 1000, seed=step)
            head = ledger.head()
            wait_until(lambda h=head: applied(pg_url, group, topic) >= h, f"step {step}")
    finally:
        process.stop()
        the_relay.stop()
        ledger.close()
    unstarted = [line for line in process.output.splitlines() if "not started processing" in line]
    assert unstarted == [], "\n".join(unstarted)


def test_a_worker_held_in_a_batch_past_the_timeout_is_reported_slow(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The other side of the test above: the check is told about the worker's batches, not
    silenced. A batch that does not finish within ``stream_processing_timeout`` while
    messages wait behind it is reported by faust as a stream slow since its last event."""
    ledger = open_ledger(pg_url)
    write_money(ledger, open_accounts(ledger, 10), 3000)
    topic, group = unique("held"), unique("group")
    the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log").start()
    process = worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "worker.log", batch=50)
    process.env.update(
        DAYBOOK_FAULTS="worker.batch:2:pause",
        DAYBOOK_FAULTS_DIR=str(tmp_path),
        STREAM_PROCESSING_TIMEOUT=str(LIVELOCK_TIMEOUT),
    )
    process.start()
    held = faults.paused_file("worker.batch", tmp_path)
    try:
        wait_until(held.exists, "the worker's second batch")
        wait_until(lambda: "Stream stopped processing, or is slow" in process.output, "faust")
        held.unlink()
        wait_until(lambda: applied(pg_url, group, topic) == ledger.head(), "every event applied")
    finally:
        held.unlink(missing_ok=True)
        process.stop()
        the_relay.stop()
        ledger.close()


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"k", partition=0)
    finally:
        await producer.stop()


def test_a_worker_waits_batch_wait_seconds_to_fill_a_batch(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """``--batch-wait 10``: six events published 0.3 s apart are applied in one or two
    batches, not a batch each. The worker pauses (fault point) at its third batch, which
    a worker that waits to fill its batches does not reach here."""
    ledger = open_ledger(pg_url)
    topic, group = unique("filled"), unique("group")
    the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log").start()
    process = worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "worker.log", batch=1000)
    process.args += ["--batch-wait", "10"]
    process.env.update(DAYBOOK_FAULTS="worker.batch:3:pause", DAYBOOK_FAULTS_DIR=str(tmp_path))
    process.start()
    third = faults.paused_file("worker.batch", tmp_path)
    try:
        wait_until(lambda: holds_partitions(process, topic), "the worker's partitions")
        account = ledger.open_account("ann", "EUR").account_id
        for _ in range(5):
            time.sleep(0.3)
            ledger.deposit(account, 10)
        head = ledger.head()
        wait_until(
            lambda: third.exists() or applied(pg_url, group, topic) == head,
            "every event applied, or a third batch",
        )
        assert not third.exists(), (
            f"--batch-wait 10 ignored: a third batch began after {applied(pg_url, group, topic)}"
            f" of {head} events"
        )
    finally:
        third.unlink(missing_ok=True)
        process.stop()
        the_relay.stop()
        ledger.close()


def test_a_worker_waiting_to_fill_a_batch_applies_it_when_told_to_stop(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """``--batch-wait 600``: a worker holding an unfilled batch stops waiting when told to
    stop, applies what it holds and exits; it does not wait out the 600 s (past its stop's
    grace, and leave without applying them)."""
    ledger = open_ledger(pg_url)
    topic, group = unique("unfilled"), unique("group")
    the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log").start()
    process = worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "worker.log", batch=1000)
    process.args += ["--batch-wait", "600"]
    process.start()
    try:
        wait_until(lambda: holds_partitions(process, topic), "the worker's partitions")
        ledger.open_account("bo", "EUR")
        head = ledger.head()
        wait_until(lambda: relay_position(pg_url, topic) == head, "the relay to publish it")
        time.sleep(1)  # for the worker to fetch it (a fetch waits 50 ms at most on the broker)
        assert process.stop() == 0, process.output
        done = applied(pg_url, group, topic)
        assert done == head, f"the worker stopped with {done} of {head} events applied"
    finally:
        process.stop()
        the_relay.stop()
        ledger.close()


def relay_position(url: str, topic: str) -> int:
    cursor = read_cursor(url, topic)
    return 0 if cursor is None else cursor.position


def test_a_worker_started_before_the_relay_creates_the_topic_with_its_partitions(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A worker started first on a new topic: its consumer's metadata request had the
    broker create the topic with a default of its own (the test broker's 4; Kafka's
    ``num.partitions``), and the relay, started after with the same --partitions, refused
    it (partitioning_mismatch). The worker creates it with its own partition count."""
    from daybook.infrastructure.streaming.broker import topic_partitions

    ledger = open_ledger(pg_url)
    write_money(ledger, open_accounts(ledger, 10), 200)
    topic, group = unique("worker-first"), unique("group")
    first = worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "worker.log").start()
    the_relay: Daybook | None = None
    try:
        wait_until(lambda: "Ready" in first.output, "the worker to start")
        assert asyncio.run(topic_partitions(kafka_bootstrap, topic)) == PARTITIONS
        the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log").start()
        wait_until(lambda: applied(pg_url, group, topic) == ledger.head(), "every event applied")
    finally:
        for process in (the_relay, first):
            if process is not None:
                assert process.stop() == 0, process.output
    assert tables(pg_url) == reference_tables(pg_url, pg_admin_url)
    ledger.close()
