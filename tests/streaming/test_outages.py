"""The relay and a worker cut off from PostgreSQL (ten seconds, starting at a log read or a
batch), a worker cut off from its read-model database alone (inside a batch's transaction),
and both cut off from the broker (mid-publish): each goes on afterwards, nothing lost,
nothing applied twice."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from daybook import open_ledger, projections
from daybook.infrastructure.bootstrap import projection_runner
from daybook.infrastructure.lifecycle import ServiceState
from daybook.infrastructure.readmodels.catalog import VersionCatalog
from daybook.infrastructure.readmodels.location import open_store
from daybook.infrastructure.settings import Settings
from daybook.infrastructure.streaming import faults
from daybook.infrastructure.streaming.app import STOP_GRACE_SECONDS
from daybook.infrastructure.streaming.broker import dead_letter_topic, ensure_topic
from daybook.infrastructure.streaming.progress import (
    PartitionStatus,
    read_dead_letters,
    read_status,
)
from daybook.infrastructure.streaming.relay import read_cursor
from daybook.infrastructure.streaming.worker import BATCH_IDLE_LIMIT_VARIABLE
from daybook.infrastructure.urls import postgres_params
from daybook.projections.accounts import ACCOUNT_BALANCES
from scripts import services
from scripts.outage import Outage
from scripts.streams import (
    Daybook,
    follow_chain,
    open_accounts,
    read_topic,
    unique,
    wait_until,
    write_money,
)
from tests.streaming.test_faults import log_with_poison
from tests.streaming.test_workers import (
    PARTITIONS,
    applied,
    applied_before,
    assignments,
    reference_tables,
    tables,
)

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]

OUTAGE_SECONDS = 10.0


def relay(
    url: str,
    bootstrap: str,
    topic: str,
    log: Path,
    env: dict[str, str],
    options: list[str] | None = None,
) -> Daybook:
    args = ["relay", "--url", url, "--broker", f"kafka://{bootstrap}", "--topic", topic]
    args += ["--partitions", str(PARTITIONS), "--batch-size", "300", "--poll-interval", "0.2"]
    return Daybook([*args, *(options or []), "-v"], log, env=env)


def worker(
    url: str,
    bootstrap: str,
    topic: str,
    group: str,
    log: Path,
    env: dict[str, str],
    readmodels: str | None = None,
    more: Sequence[str] = (),
) -> Daybook:
    args = ["worker", "--url", url, "--broker", f"kafka://{bootstrap}", "--topic", topic]
    if readmodels is not None:
        args += ["--readmodels-url", readmodels]
    args += ["--partitions", str(PARTITIONS), "--group", group, "--batch-size", "300", "-v"]
    args += more
    return Daybook(args, log, env=env)


def paused(directory: Path, name: str) -> Path:
    return faults.paused_file(name, directory)


@contextmanager
def broker_behind_a_proxy(tmp_path: Path) -> Iterator[tuple[Outage, str]]:
    """A broker of its own behind the proxy, advertising the proxy's address (Kafka clients
    connect where the metadata says, so every connection goes through it): the proxy and
    the bootstrap address; the broker stops on the way out."""
    port = services.free_port()
    with Outage("127.0.0.1", port) as outage:
        bootstrap = f"127.0.0.1:{outage.port}"
        broker = services.start_kafka(tmp_path / "kafka", port=port, advertised=bootstrap)
        try:
            yield outage, bootstrap
        finally:
            broker.stop()


def test_the_relay_survives_ten_seconds_without_its_database_from_a_log_read(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 20)
    write_money(ledger, accounts, 1500)
    topic = unique("relay-outage")
    env = {"DAYBOOK_FAULTS": "log.read:3:pause", "DAYBOOK_FAULTS_DIR": str(tmp_path)}
    with Outage.of_url(pg_url) as outage:
        process = relay(outage.url(pg_url), kafka_bootstrap, topic, tmp_path / "relay.log", env)
        process.start()
        try:
            wait_until(paused(tmp_path, "log.read").exists, "the relay's third log read")
            outage.cut()
            paused(tmp_path, "log.read").unlink()
            write_money(ledger, accounts, 500, seed=2)
            time.sleep(OUTAGE_SECONDS)
            assert process.proc is not None and process.proc.poll() is None, process.output
            outage.restore()
            head = ledger.head()
            wait_until(lambda: _cursor(pg_url, topic) == head, "the relay to catch up")
        finally:
            assert process.stop() == 0, process.output
    positions, _, gaps = follow_chain(read_topic(kafka_bootstrap, topic, PARTITIONS, head))
    assert sorted(positions) == list(range(1, head + 1)) and gaps == 0
    ledger.close()


def test_a_worker_survives_ten_seconds_without_its_database_from_a_batch(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 20)
    write_money(ledger, accounts, 1500)
    topic, group = unique("worker-outage"), unique("group")
    env = {"DAYBOOK_FAULTS": "worker.batch:2:pause", "DAYBOOK_FAULTS_DIR": str(tmp_path)}
    with Outage.of_url(pg_url) as outage:
        the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log", {}).start()
        process = worker(outage.url(pg_url), kafka_bootstrap, topic, group, tmp_path / "w.log", env)
        process.start()
        try:
            wait_until(paused(tmp_path, "worker.batch").exists, "the worker's second batch")
            outage.cut()
            paused(tmp_path, "worker.batch").unlink()
            write_money(ledger, accounts, 500, seed=2)
            time.sleep(OUTAGE_SECONDS)
            assert process.proc is not None and process.proc.poll() is None, process.output
            outage.restore()
            head = ledger.head()
            caught_up_and_live(pg_url, group, topic, head)
        finally:
            for each in (process, the_relay):
                assert each.stop() == 0, each.output
    assert tables(pg_url) == reference_tables(pg_url, pg_admin_url)
    ledger.close()


@pytest.mark.parametrize("save_lands", [True, False], ids=["reply-lost", "save-lost"])
def test_the_relay_survives_losing_the_reply_to_saving_its_cursor(
    save_lands: bool, pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The relay's second batch acknowledged by the broker; then the statement that moves
    its cursor reaches PostgreSQL and is carried out, and the reply is lost (or, the other
    case, the connection is gone before it is sent). The relay cannot tell which; it goes on
    from the stored cursor: after the saved move it publishes nothing twice, after the lost
    one it publishes that batch again and the worker skips the repeats. Every event is on
    the topic in an unbroken chain, and the tables equal the in-process runner's."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 20)
    write_money(ledger, accounts, 1500)
    topic, group = unique("relay-save"), unique("group")
    env = {"DAYBOOK_FAULTS": "relay.after_send:2:pause", "DAYBOOK_FAULTS_DIR": str(tmp_path)}
    with Outage.of_url(pg_url) as outage:
        the_relay = relay(outage.url(pg_url), kafka_bootstrap, topic, tmp_path / "relay.log", env)
        the_relay.start()
        process = worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "w.log", {}).start()
        try:
            wait_until(paused(tmp_path, "relay.after_send").exists, "the relay's second batch")
            before = _cursor(pg_url, topic)
            if save_lands:
                outage.cut_after_next_request()
            else:
                outage.cut()
            paused(tmp_path, "relay.after_send").unlink()
            wait_until(lambda: outage.cuts == 1, "the cut")
            # The move was carried out (the server may finish it after the cut), or not, as
            # the case says; the relay cannot know.
            if save_lands:
                wait_until(lambda: _cursor(pg_url, topic) > before, "the saved move")
            after = _cursor(pg_url, topic)
            assert (after > before) is save_lands, (before, after)
            write_money(ledger, accounts, 300, seed=2)
            time.sleep(READ_MODEL_OUTAGE_SECONDS)
            assert the_relay.proc is not None and the_relay.proc.poll() is None, the_relay.output
            assert _cursor(pg_url, topic) == after  # it cannot have moved meanwhile
            outage.restore()
            head = ledger.head()
            wait_until(lambda: _cursor(pg_url, topic) == head, "the relay to catch up")
            status = caught_up_and_live(pg_url, group, topic, head)
            seen = read_topic(kafka_bootstrap, topic, PARTITIONS, head)
        finally:
            for each in (process, the_relay):
                assert each.stop() == 0, each.output
    # It did meet the outage at the save, and restarted (rather than never noticing).
    assert "fault point relay.after_send: paused" in the_relay.output
    assert "restarting in" in the_relay.output and "recovered" in the_relay.output
    positions, duplicates, gaps = follow_chain(seen)
    assert sorted(positions) == list(range(1, head + 1)) and gaps == 0
    # Published once after the saved move; the batch again after the lost one.
    assert (duplicates == 0) is save_lands, duplicates
    assert (sum(p.duplicates for p in status) == 0) is save_lands, status
    assert tables(pg_url) == reference_tables(pg_url, pg_admin_url)
    ledger.close()


def _cursor(url: str, topic: str) -> int:
    cursor = read_cursor(url, topic)
    return cursor.position if cursor else 0


#: The read-model outages below last a few seconds, not ten: the worker has no timer that an
#: outage's length could outlast (a failed batch is judged transient and retried after a
#: backoff whose ceiling it reaches within seconds), so what a test must show is where the
#: outage starts.
READ_MODEL_OUTAGE_SECONDS = 2.5

#: Table writes in one batch (every projection writes each of its tables once).
TABLES_PER_BATCH = sum(len(projection.tables) for projection in projections.ALL)


@pytest.mark.parametrize(
    ("point", "commit_lands"),
    [
        # In the second batch: its messages classified against the progress rows, some of
        # its rows written, the rest not.
        (f"rows.write:{TABLES_PER_BATCH + 2}", False),
        # The second batch's rows and progress written, its COMMIT sent and carried out,
        # the reply lost: the worker cannot tell whether the batch is in. (A COMMIT lost
        # on its way is, on the server, the rollback of the case above.)
        ("worker.commit:2", True),
    ],
    ids=["mid-apply", "commit-reply-lost"],
)
def test_a_worker_survives_its_read_model_database_gone_mid_batch(
    point: str,
    commit_lands: bool,
    pg_url: str,
    pg_admin_url: str,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    """Read models on a database of their own, which alone goes away (the event store and
    the broker stay) inside a batch's transaction. The worker retries the batch by itself;
    nothing was acknowledged to Kafka, so the same messages come again: applied once if
    the batch was rolled back, skipped as duplicates if it was committed. The tables equal
    the in-process runner's."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 20)
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    topic, group = unique("worker-rm-outage"), unique("group")
    name = point.partition(":")[0]
    env = {"DAYBOOK_FAULTS": f"{point}:pause", "DAYBOOK_FAULTS_DIR": str(tmp_path)}
    with Outage.of_url(readmodels) as outage:
        the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log", {}).start()
        process = worker(
            pg_url, kafka_bootstrap, topic, group, tmp_path / "w.log", env, outage.url(readmodels)
        )
        process.start()
        try:
            write_money(ledger, accounts, 800)  # while the worker joins its group
            wait_until(paused(tmp_path, name).exists, f"the worker to reach {point}")
            if commit_lands:
                outage.cut_after_next_request()
            else:
                outage.cut()
            paused(tmp_path, name).unlink()
            write_money(ledger, accounts, 300, seed=2)
            time.sleep(READ_MODEL_OUTAGE_SECONDS)
            assert process.proc is not None and process.proc.poll() is None, process.output
            outage.restore()
            head = ledger.head()
            status = caught_up_and_live(readmodels, group, topic, head)
            if commit_lands:  # the committed batch came again, and was recognised
                assert sum(p.duplicates for p in status) > 0, status
        finally:
            for each in (process, the_relay):
                assert each.stop() == 0, each.output
    # It did meet the outage inside the batch, and retried (rather than never noticing).
    assert f"fault point {name}: paused" in process.output
    assert "restarting in" in process.output and "recovered" in process.output
    assert tables(readmodels) == reference_tables(pg_url, pg_admin_url)
    ledger.close()


def test_a_worker_survives_its_read_model_database_gone_while_it_fetches(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Read models on a database of their own, which alone goes away while the worker has
    applied everything there was and waits on its Kafka fetch (no batch in flight: its
    connection is idle, and only the next batch finds it dead). Events arrive during the
    outage; the worker fetches them, fails to apply them, and retries the same batch until
    the database is back. The tables equal the in-process runner's."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 20)
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    topic, group = unique("worker-fetch-outage"), unique("group")
    with Outage.of_url(readmodels) as outage:
        the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log", {}).start()
        process = worker(
            pg_url, kafka_bootstrap, topic, group, tmp_path / "w.log", {}, outage.url(readmodels)
        )
        process.start()
        try:
            write_money(ledger, accounts, 800)
            head = ledger.head()
            wait_until(lambda: applied(readmodels, group, topic) == head, "the first events")
            outage.cut()  # the worker is between batches, in its fetch loop
            write_money(ledger, accounts, 300, seed=2)
            head = ledger.head()
            wait_until(lambda: _cursor(pg_url, topic) == head, "the relay to publish them")
            wait_until(lambda: "restarting in" in process.output, "the worker to meet the outage")
            time.sleep(READ_MODEL_OUTAGE_SECONDS)
            assert process.proc is not None and process.proc.poll() is None, process.output
            outage.restore()
            caught_up_and_live(readmodels, group, topic, head)
        finally:
            for each in (process, the_relay):
                assert each.stop() == 0, each.output
    assert "recovered" in process.output
    assert tables(readmodels) == reference_tables(pg_url, pg_admin_url)
    ledger.close()


def test_a_worker_waiting_out_an_outage_stops_on_sigterm_and_a_new_one_goes_on(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A worker retrying a batch through an outage of its read-model database still stops
    when told (SIGTERM), at once, with nothing of that batch acknowledged: faust must not
    wait for it. A worker started once the database is back applies it."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 20)
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    topic, group = unique("worker-stop-outage"), unique("group")
    with Outage.of_url(readmodels) as outage:
        the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log", {}).start()
        process = worker(
            pg_url, kafka_bootstrap, topic, group, tmp_path / "w.log", {}, outage.url(readmodels)
        )
        process.start()
        after: Daybook | None = None
        try:
            write_money(ledger, accounts, 800)
            head = ledger.head()
            wait_until(lambda: applied(readmodels, group, topic) == head, "the first events")
            outage.cut()
            write_money(ledger, accounts, 300, seed=2)
            wait_until(lambda: "restarting in" in process.output, "the worker to meet the outage")
            assert process.stop() == 0, process.output  # SIGTERM, the outage still on
            outage.restore()
            head = ledger.head()
            after = worker(
                pg_url, kafka_bootstrap, topic, group, tmp_path / "w2.log", {},
                outage.url(readmodels),
            ).start()  # fmt: skip
            caught_up_and_live(readmodels, group, topic, head)
        finally:
            for each in (after, the_relay):
                if each is not None:
                    assert each.stop() == 0, each.output
    assert tables(readmodels) == reference_tables(pg_url, pg_admin_url)
    ledger.close()


#: Past eventsourcing's own retries (about two seconds) of a log read.
BOTH_DOWN_SECONDS = 5.0


def test_every_service_survives_both_databases_gone_at_once(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The event store and the read-model databases go away together, while the relay,
    a worker (read models on a database of its own) and the in-process runner (on another)
    work through a backlog; commands go on meanwhile (straight to the event store). Each
    service waits the outage out and catches up: every event on the topic once in an
    unbroken chain, and both sets of tables equal a replay of the whole log."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 20)
    write_money(ledger, accounts, 1500)
    topic, group = unique("both-down"), unique("group")
    worker_rm = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    runner_rm = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    with (
        Outage.of_url(pg_url) as events,
        Outage.of_url(worker_rm) as worker_side,
        Outage.of_url(runner_rm) as runner_side,
    ):
        outages = (events, worker_side, runner_side)
        the_relay = relay(events.url(pg_url), kafka_bootstrap, topic, tmp_path / "relay.log", {})
        the_relay.start()
        process = worker(
            events.url(pg_url),
            kafka_bootstrap,
            topic,
            group,
            tmp_path / "w.log",
            {},
            worker_side.url(worker_rm),
        )
        process.start()
        runner = projection_runner(
            Settings(url=events.url(pg_url), readmodels_url=runner_side.url(runner_rm)),
            poll_interval=0.05,
            batch_size=100,
        )
        runner.start()
        try:
            wait_until(
                lambda: applied(worker_rm, group, topic) > 0 and min(_positions(runner_rm)) > 0,
                "the worker and the runner to have started applying",
            )
            for outage in outages:
                outage.cut()
            write_money(ledger, accounts, 300, seed=2)
            time.sleep(BOTH_DOWN_SECONDS)
            for each in (the_relay, process):
                assert each.proc is not None and each.proc.poll() is None, each.output
            assert runner.health().state is not ServiceState.FAILED, runner.health()
            for outage in outages:
                outage.restore()
            head = ledger.head()
            wait_until(lambda: _cursor(pg_url, topic) == head, "the relay to catch up")
            wait_until(lambda: set(_positions(runner_rm)) == {head}, "the runner to catch up")
            caught_up_and_live(worker_rm, group, topic, head)
            assert runner.health().state is ServiceState.RUNNING, runner.health()
            seen = read_topic(kafka_bootstrap, topic, PARTITIONS, head)
        finally:
            runner.stop()
            for each in (process, the_relay):
                assert each.stop() == 0, each.output
    for each in (the_relay, process):  # each met the outage, and recovered
        assert "restarting in" in each.output and "recovered" in each.output, each.output
    positions, _, gaps = follow_chain(seen)
    assert sorted(positions) == list(range(1, head + 1)) and gaps == 0
    reference = reference_tables(pg_url, pg_admin_url)
    assert tables(worker_rm) == reference
    assert tables(runner_rm) == reference
    ledger.close()


def _positions(url: str) -> list[int]:
    """The runner's versions' positions ([0] before it made its catalog)."""
    store = open_store(url)
    try:
        catalog = VersionCatalog(store)
        catalog.ensure()
        return [r.position for r in catalog.versions()] or [0]
    finally:
        store.close()


#: Longer than the relay's request timeout below (``--request-timeout``): the batch in
#: flight then fails (rather than being delivered late by the producer's own retries) and
#: the relay goes through its "broker unavailable" path: new producers, refused until the
#: broker is back. Past that, no timer of the relay or the worker could be outlasted by a
#: longer outage. (The outage lasts at least this long, and until the relay has failed.)
BROKER_OUTAGE_SECONDS = 3.0
RELAY_REQUEST_TIMEOUT = 1.0


def test_the_relay_and_a_worker_survive_the_broker_gone_mid_publish(
    pg_url: str, pg_admin_url: str, tmp_path: Path
) -> None:
    """A broker of its own behind the proxy, advertising the proxy's address (Kafka clients
    connect where the metadata says, so every connection goes through it), unreachable
    from the moment the relay has handed a batch to its producer and waits for the
    acknowledgements. ``daybook relay`` runs as a process of its own, with a short
    ``--request-timeout``. Neither the relay nor the worker stops; the relay keeps its
    cursor (no rewind, no re-publishing of the log) and publishes on from it: every event
    is on the topic, and the worker's tables equal the in-process runner's."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 20)
    write_money(ledger, accounts, 1500)
    topic, group = unique("broker-outage"), unique("group")
    env = {"DAYBOOK_FAULTS": "relay.mid_send:2:pause", "DAYBOOK_FAULTS_DIR": str(tmp_path)}
    with broker_behind_a_proxy(tmp_path) as (outage, bootstrap):
        the_relay = relay(
            pg_url,
            bootstrap,
            topic,
            tmp_path / "relay.log",
            env,
            ["--request-timeout", str(RELAY_REQUEST_TIMEOUT)],
        ).start()
        process = worker(pg_url, bootstrap, topic, group, tmp_path / "w.log", {}).start()
        try:
            wait_until(paused(tmp_path, "relay.mid_send").exists, "the relay's second send")
            before = _cursor(pg_url, topic)
            wait_until(lambda: applied(pg_url, group, topic) == before, "the worker's first batch")
            outage.cut()
            paused(tmp_path, "relay.mid_send").unlink()
            write_money(ledger, accounts, 500, seed=2)
            time.sleep(BROKER_OUTAGE_SECONDS)
            # The batch in flight fails within the request timeout (rather than being
            # delivered late by the producer's own retries): the relay goes through its
            # broker-down path. On a loaded machine it may take longer than the outage to
            # say so, so the outage lasts until it has, at most 10 s: well past the 1 s
            # asked for, and short of the relay's default request timeout (15 s).
            wait_until(
                lambda: "broker unavailable" in the_relay.output, "the relay's failure", 10.0
            )
            for each in (the_relay, process):
                assert each.proc is not None and each.proc.poll() is None, each.output
            assert _cursor(pg_url, topic) == before  # kept, neither moved nor rewound
            outage.restore()
            head = ledger.head()
            wait_until(lambda: _cursor(pg_url, topic) == head, "the relay to catch up")
            caught_up_and_live(pg_url, group, topic, head)
            cursor = read_cursor(pg_url, topic)
            assert cursor is not None and cursor.republished == 0 and before > 0
            seen = read_topic(bootstrap, topic, PARTITIONS, head)
        finally:
            for each in (process, the_relay):
                assert each.stop() == 0, each.output
    positions, duplicates, gaps = follow_chain(seen)
    assert sorted(positions) == list(range(1, head + 1)) and gaps == 0
    # At most the batch in flight at the cut is on the topic twice: the relay went on from
    # its cursor, not from where it took the lead (it published the first batch again).
    assert duplicates < before, f"{duplicates} events published twice"
    assert tables(pg_url) == reference_tables(pg_url, pg_admin_url)
    ledger.close()


def caught_up_and_live(url: str, group: str, topic: str, head: int) -> list[PartitionStatus]:
    """Wait until the group's workers applied every event up to ``head`` (their read
    models at ``url``); every partition is then live, with no event parked. Its status."""
    wait_until(lambda: applied(url, group, topic) == head, "the worker to catch up")
    status = read_status(url, group, topic)
    assert all(p.state == "live" and p.dead_letters == 0 for p in status)
    return status


def test_a_worker_whose_broker_goes_between_its_check_and_its_start_waits_for_it(
    pg_url: str, pg_admin_url: str, tmp_path: Path
) -> None:
    """The broker answers the worker's check at start, then goes before faust's own start
    reaches it. faust's start fails (and exits the process, as it always does); the worker
    starts again in place, waits at its check for the broker, saying so, and once the broker
    is back it starts and applies every event: it does not end for an outage."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 10)
    write_money(ledger, accounts, 300)
    topic, group = unique("start-outage"), unique("group")
    env = {"DAYBOOK_FAULTS": "worker.start:1:pause", "DAYBOOK_FAULTS_DIR": str(tmp_path)}
    marker = paused(tmp_path, "worker.start")
    with broker_behind_a_proxy(tmp_path) as (outage, bootstrap):
        process = worker(pg_url, bootstrap, topic, group, tmp_path / "w.log", env).start()
        the_relay: Daybook | None = None
        try:
            wait_until(marker.exists, "the worker to pass its check")
            outage.cut()
            marker.unlink()
            wait_until(lambda: "waiting at start" in process.output, "the worker to wait")
            assert "restarting this worker in place" in process.output
            # faust's line for the failed start stays, without a traceback: it is an outage.
            assert "Error: KafkaConnectionError" in process.output
            assert "Traceback" not in process.output
            assert process.proc is not None and process.proc.poll() is None, process.output
            outage.restore()
            # The process started again is armed as the first was: let it through.
            wait_until(marker.exists, "the started-again worker to pass its check")
            marker.unlink()
            the_relay = relay(pg_url, bootstrap, topic, tmp_path / "relay.log", {}).start()
            head = ledger.head()
            caught_up_and_live(pg_url, group, topic, head)
            assert "answers now" in process.output
        finally:
            for each in (process, the_relay):
                if each is not None:
                    assert each.stop() == 0, each.output
    assert tables(pg_url) == reference_tables(pg_url, pg_admin_url)
    ledger.close()


def test_a_worker_whose_start_fails_for_another_reason_than_the_broker_stops(
    pg_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Only a broker that fails faust's start brings the worker back in place: a web port
    already taken ends it with its reason, once."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["worker", "--url", pg_url, "--broker", f"kafka://{kafka_bootstrap}"]
        args += ["--topic", unique("taken"), "--port", str(port)]
        process = Daybook(args, tmp_path / "w.log").start()
        assert process.wait(60) == 1, process.output
    assert "address already in use" in process.output
    assert "restarting this worker in place" not in process.output


def test_a_worker_with_no_startup_wait_does_not_start_again_when_the_broker_fails_it(
    pg_url: str, tmp_path: Path
) -> None:
    env = {"DAYBOOK_FAULTS": "worker.start:1:pause", "DAYBOOK_FAULTS_DIR": str(tmp_path)}
    marker = paused(tmp_path, "worker.start")
    with broker_behind_a_proxy(tmp_path) as (outage, bootstrap):
        args = ["worker", "--url", pg_url, "--broker", f"kafka://{bootstrap}"]
        args += ["--topic", unique("no-wait"), "--startup-wait", "0"]
        process = Daybook(args, tmp_path / "w.log", env=env).start()
        wait_until(marker.exists, "the worker to pass its check")
        outage.cut()
        marker.unlink()
        assert process.wait(60) == 1, process.output
    assert "restarting this worker in place" not in process.output


def test_the_broker_probe_takes_a_broker_for_a_broker(kafka_bootstrap: str) -> None:
    """When a broker gives no metadata (starting up), the check probes its port to tell a
    broker from some other server, which it refuses at once: the probe must know a real
    broker's answer, or a broker slow to start would end the services waiting for it."""
    from daybook.infrastructure import preflight

    host, _, port = kafka_bootstrap.split(",")[0].rpartition(":")
    assert preflight._stranger_at((host, int(port))) is None


def _retrying(port: int, group: str) -> float:
    """The worker's ``daybook_service_retrying`` as its metrics port serves it."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    name = f'daybook_service_retrying{{service="stream worker {group}"}} '
    values = [float(line[len(name) :]) for line in body.splitlines() if line.startswith(name)]
    return values[0] if values else 0.0


def test_a_worker_whose_batch_meets_a_lock_held_elsewhere_says_so_and_stops_on_sigterm(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A session keeps the group's progress rows locked (a former owner frozen after a
    rebalance, an operator's open transaction): the batch queued for them for ever, the
    worker's health said it ran, and SIGTERM waited for the lock (faust waits for the
    batch). The batch now gives up after its lock wait and is retried with backoff, as an
    outage: the worker says it retries, and stops on SIGTERM; nothing is lost."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 20)
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    topic, group = unique("locked"), unique("group")
    port = services.free_port()
    the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log", {}).start()
    metrics_port = ["--metrics-port", str(port)]
    process = worker(
        pg_url, kafka_bootstrap, topic, group, tmp_path / "w.log", {}, readmodels, metrics_port
    ).start()
    holder = psycopg.connect(postgres_params(readmodels).conninfo())
    try:
        write_money(ledger, accounts, 300)
        head = ledger.head()
        wait_until(lambda: applied(readmodels, group, topic) == head, "the first events")
        holder.execute(
            "SELECT * FROM daybook_stream_progress WHERE group_id = %s FOR UPDATE", (group,)
        )
        write_money(ledger, accounts, 100, seed=2)
        wait_until(lambda: _retrying(port, group) == 1, "the worker to say it retries")
        assert process.stop() == 0, process.output  # while the lock is still held
        holder.rollback()
        head = ledger.head()
        process = worker(
            pg_url, kafka_bootstrap, topic, group, tmp_path / "w2.log", {}, readmodels
        ).start()
        wait_until(lambda: applied(readmodels, group, topic) == head, "the rest")
        assert process.stop() == 0, process.output
    finally:
        holder.close()
        process.stop()
        the_relay.stop()
        ledger.close()
    assert tables(readmodels) == reference_tables(pg_url, pg_admin_url)


@dataclass
class _CutOff:
    """A worker of ``group`` whose read models (``readmodels``) sit behind a proxy that is
    cut while it works (metrics on ``port``)."""

    url: str
    bootstrap: str
    topic: str
    group: str
    readmodels: str
    port: int

    @contextmanager
    def an_outage_at_its_start(self, tmp_path: Path) -> Iterator[tuple[Outage, Daybook]]:
        """The proxy, cut, and the worker, once it says it retries; stopped on the way out."""
        env = {"DAYBOOK_FAULTS": "worker.start:1:pause", "DAYBOOK_FAULTS_DIR": str(tmp_path)}
        with Outage.of_url(self.readmodels) as outage:
            process = worker(
                self.url,
                self.bootstrap,
                self.topic,
                self.group,
                tmp_path / "w.log",
                env,
                outage.url(self.readmodels),
                ["--metrics-port", str(self.port)],
            ).start()
            try:
                marker = paused(tmp_path, "worker.start")
                wait_until(marker.exists, "the worker at its start")
                outage.cut()
                marker.unlink()
                wait_until(lambda: _retrying(self.port, self.group) == 1, "it to retry")
                yield outage, process
            finally:
                process.stop()

    @contextmanager
    def after_a_rebalance(self, tmp_path: Path) -> Iterator[tuple[Outage, Daybook]]:
        """The proxy, still cut, and the worker, settled on its partitions once more and
        still saying it retries; both stopped on the way out.

        The worker is frozen (SIGSTOP) while it retries, so that the group drops it; a
        second worker, whose read models are not cut off, takes every partition and applies
        (and acknowledges) everything, including the batch the first one held. Woken, the
        first one finds itself out of the group: it gives its batch up and rejoins, to
        partitions with nothing left on them."""
        ledger = open_ledger(self.url)
        accounts = open_accounts(ledger, 20)
        the_relay = relay(self.url, self.bootstrap, self.topic, tmp_path / "relay.log", {})
        the_relay.start()
        other: Daybook | None = None
        with Outage.of_url(self.readmodels) as outage:
            process = worker(
                self.url, self.bootstrap, self.topic, self.group, tmp_path / "w.log", {},
                outage.url(self.readmodels), ["--metrics-port", str(self.port)],
            ).start()  # fmt: skip
            try:
                write_money(ledger, accounts, 300)
                head = ledger.head()
                wait_until(lambda: applied(self.readmodels, self.group, self.topic) == head,
                           "the first events")  # fmt: skip
                outage.cut()
                write_money(ledger, accounts, 100, seed=2)
                head = ledger.head()
                wait_until(lambda: _retrying(self.port, self.group) == 1, "it to retry")
                assert process.proc is not None
                assigned = sum(assignments(process.output, self.topic))
                process.proc.send_signal(signal.SIGSTOP)
                other = worker(
                    self.url, self.bootstrap, self.topic, self.group, tmp_path / "w2.log", {},
                    self.readmodels,
                ).start()  # fmt: skip
                wait_until(lambda: applied(self.readmodels, self.group, self.topic) == head,
                           "the second worker to apply everything")  # fmt: skip
                process.proc.send_signal(signal.SIGCONT)
                wait_until(lambda: sum(assignments(process.output, self.topic)) > assigned,
                           "the first worker to get partitions again")  # fmt: skip
                assert _retrying(self.port, self.group) == 1, process.output
                yield outage, process
            finally:
                if process.proc is not None:
                    process.proc.send_signal(signal.SIGCONT)
                for each in (other, process, the_relay):
                    if each is not None:
                        each.stop()
                ledger.close()


def test_a_worker_whose_read_models_go_as_it_starts_waits_and_stops_on_sigterm(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The read-model database gone just as the worker's agent starts (after the checks
    at its start): the error escaped the agent, which faust restarted every 5 s with a
    traceback while the worker said it ran, and SIGTERM never ended it afterwards. The
    start now leaves the outage to its batches, which wait it out: the worker says it
    retries, stops on SIGTERM during the outage, and the next one catches up."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 20)
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    topic, group = unique("startdown"), unique("group")
    port = services.free_port()
    write_money(ledger, accounts, 200)
    the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log", {}).start()
    into = _CutOff(pg_url, kafka_bootstrap, topic, group, readmodels, port)
    with into.an_outage_at_its_start(tmp_path) as (outage, process):
        try:
            # Meanwhile its consumer fetches the topic's messages: a stop must not wait for
            # them (nothing of the outage can be acknowledged).
            time.sleep(5)
            assert "Traceback" not in process.output, process.output
            assert process.stop() == 0, process.output  # SIGTERM during the outage
            outage.restore()
            head = ledger.head()
            process = worker(
                pg_url,
                kafka_bootstrap,
                topic,
                group,
                tmp_path / "w2.log",
                {},
                outage.url(readmodels),
                ["--metrics-port", str(port)],
            ).start()
            wait_until(lambda: applied(readmodels, group, topic) == head, "the worker after it")
            assert _retrying(port, group) == 0
            assert process.stop() == 0, process.output
        finally:
            process.stop()
            the_relay.stop()
            ledger.close()
    assert tables(readmodels) == reference_tables(pg_url, pg_admin_url)


def test_an_idle_worker_whose_read_models_go_as_it_starts_retries_until_they_answer(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The read-model database gone as the worker's agent starts, on a topic where nothing
    is published: the checks at its start met the outage and left it to the first batch,
    which never came, so the worker said it ran (health, ``daybook_service_retrying`` 0, no
    warning) while its database was away. It says it retries until the database answers,
    then runs."""
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    topic, group = unique("idlestart"), unique("group")
    asyncio.run(ensure_topic(kafka_bootstrap, topic, PARTITIONS))  # and nothing on it
    port = services.free_port()
    into = _CutOff(pg_url, kafka_bootstrap, topic, group, readmodels, port)
    with into.an_outage_at_its_start(tmp_path) as (outage, process):  # it says it retries
        assert "restarting in" in process.output, process.output
        outage.restore()
        wait_until(lambda: _retrying(port, group) == 0, "it to say it runs", 30)
        assert process.stop() == 0, process.output
    assert "recovered" in process.output
    assert "Traceback" not in process.output, process.output


def test_an_idle_worker_whose_start_checks_met_an_outage_is_refused_once_they_pass(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The same start, by a worker its group cannot serve (versions new to a group that has
    applied events: ``group_already_started``): what its idle worker tries once the
    database answers is the checks at its start, not a mere connection, so it stops with
    the refusal in one line (exit 1) rather than say it runs."""
    ledger = open_ledger(pg_url)
    open_accounts(ledger, 3)
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    topic, group = unique("idlerefused"), unique("group")
    try:
        applied_before(readmodels, ledger, [ACCOUNT_BALANCES], group, topic)
    finally:
        ledger.close()
    asyncio.run(ensure_topic(kafka_bootstrap, topic, PARTITIONS))  # and nothing on it
    port = services.free_port()
    into = _CutOff(pg_url, kafka_bootstrap, topic, group, readmodels, port)
    with into.an_outage_at_its_start(tmp_path) as (outage, process):  # it says it retries
        outage.restore()
        assert process.wait(30) == 1, process.output
    assert "group_already_started" in process.output, process.output
    assert "recovered" not in process.output
    assert "Traceback" not in process.output, process.output


def test_a_worker_whose_start_checks_met_an_outage_checks_again_before_its_first_batch(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A worker started with another partition count than its group's versions record
    (only the start checks it): its checks met an outage, and events published meanwhile
    are in hand when the database answers. The checks come first, and refuse it; applied,
    the batch would have mapped the events to other partitions than the group's vector."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 3)
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    topic, group = unique("busyrefused"), unique("group")
    twice = 2 * PARTITIONS
    applied_before(readmodels, ledger, projections.ALL, group, topic, twice)
    asyncio.run(ensure_topic(kafka_bootstrap, topic, PARTITIONS))
    into = _CutOff(pg_url, kafka_bootstrap, topic, group, readmodels, services.free_port())
    with into.an_outage_at_its_start(tmp_path) as (outage, process):  # it says it retries
        the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log", {}).start()
        try:
            write_money(ledger, accounts, 50)
            head = ledger.head()

            def published() -> bool:
                cursor = read_cursor(pg_url, topic)
                return cursor is not None and cursor.position >= head

            wait_until(published, "the relay to publish them")
            time.sleep(3)  # for the worker to fetch them (it retries them meanwhile)
        finally:
            the_relay.stop()
            ledger.close()
        outage.restore()
        assert process.wait(30) == 1, process.output
    assert "partitioning_mismatch" in process.output, process.output
    assert "Traceback" not in process.output, process.output


async def _all_keys(bootstrap: str, topic: str, seconds: float) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    keys: list[bytes] = []
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                keys.extend(m.key for m in messages)
    finally:
        await consumer.stop()
    return keys


def test_a_letter_parked_by_the_first_batch_after_a_failed_start_publish_goes_once(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The start's publish of dead letters failed (the read models away), so the first
    batch after the outage published what was left, its own letter among them, and then
    its own letters again: twice on the dead-letter topic. Each goes once."""
    ledger = open_ledger(pg_url)
    poison, _ = log_with_poison(ledger, 3, 5)
    head = ledger.head()
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    topic, group = unique("dupletters"), unique("group")
    port = services.free_port()
    the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log", {}).start()
    wait_until(lambda: _cursor(pg_url, topic) == head, "everything on the topic")
    into = _CutOff(pg_url, kafka_bootstrap, topic, group, readmodels, port)
    with into.an_outage_at_its_start(tmp_path) as (outage, process):
        try:
            outage.restore()
            wait_until(lambda: applied(readmodels, group, topic) == head - 1, "the batch")
            (letter,) = read_dead_letters(readmodels, group, topic)
            assert letter["position"] == poison
            keys = asyncio.run(_all_keys(kafka_bootstrap, dead_letter_topic(topic), 10))
        finally:
            process.stop()
            the_relay.stop()
            ledger.close()
    assert keys == [str(poison).encode()], f"on the dead-letter topic: {keys}"


def test_a_letter_an_outage_kept_from_the_topic_goes_once_the_database_answers_idle(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A letter parked and recorded, not yet published (its worker stopped first), and the
    next worker's publish at its start met a read-model outage: it waited for a batch to
    publish it, which on a quiet topic never came. The worker publishes it once its
    database answers."""
    ledger = open_ledger(pg_url)
    poison, _ = log_with_poison(ledger, 3, 5)
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    topic, group = unique("idleletters"), unique("group")
    try:  # parks the poison, publishes nothing
        applied_before(readmodels, ledger, projections.ALL, group, topic)
    finally:
        ledger.close()
    asyncio.run(ensure_topic(kafka_bootstrap, topic, PARTITIONS))  # and nothing on it
    into = _CutOff(pg_url, kafka_bootstrap, topic, group, readmodels, services.free_port())
    with into.an_outage_at_its_start(tmp_path) as (outage, process):
        outage.restore()
        wait_until(lambda: "recovered" in process.output, "the worker to recover")
        keys = asyncio.run(_all_keys(kafka_bootstrap, dead_letter_topic(topic), 10))
    assert keys == [str(poison).encode()], f"on the dead-letter topic: {keys}"


def test_an_idle_worker_that_gave_up_a_batch_on_a_rebalance_runs_once_its_database_is_back(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A worker gave up the batch it retried through an outage because a rebalance took its
    partitions; nothing more came for the partitions it owned after it. Once the database
    was back it said it retried (health, ``daybook_service_retrying``) until a batch went
    through, which on an idle topic was never. It says it runs once its database answers."""
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    port = services.free_port()
    abandoned = _CutOff(
        pg_url, kafka_bootstrap, unique("abandoned"), unique("group"), readmodels, port
    )
    with abandoned.after_a_rebalance(tmp_path) as (outage, process):
        outage.restore()  # and nothing more is published
        wait_until(lambda: _retrying(port, abandoned.group) == 0, "it to say it runs", 30)
        assert process.stop() == 0, process.output
    assert "recovered" in process.output


def test_an_idle_worker_that_gave_up_a_batch_on_a_rebalance_retries_while_its_database_is_gone(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The same worker, its database still away: it says it retries, having tried it again
    (it runs only once the database answers)."""
    readmodels = services.create_database(pg_admin_url, unique("daybook_rm").replace("-", "_"))
    port = services.free_port()
    abandoned = _CutOff(
        pg_url, kafka_bootstrap, unique("abandoned"), unique("group"), readmodels, port
    )
    with abandoned.after_a_rebalance(tmp_path) as (_outage, process):
        # Its retry line is rate-limited: the next one, up to 30 s later, counts the
        # attempts held back since the first.
        again = re.compile(r"restarting in \S+ \(and \d+ more like it since the last\)")
        wait_until(lambda: again.search(process.output) is not None, "it to try again")
        assert _retrying(port, abandoned.group) == 1, process.output
        assert process.stop() == 0, process.output
    assert "recovered" not in process.output


def test_a_worker_told_to_stop_during_a_broker_outage_exits_within_seconds(
    pg_url: str, tmp_path: Path
) -> None:
    """A batch is applied and acknowledged, and the broker goes before its offsets are
    committed. faust's stop commits them last, and aiokafka waits for the broker without
    a deadline: SIGTERM waited for as long as the outage lasted (a SIGKILL at 30 s here).
    The worker now exits anyway ``STOP_GRACE_SECONDS`` after the signal, with status 0,
    saying so; the next worker skips what comes again."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 4)
    write_money(ledger, accounts, 20)
    head = ledger.head()
    topic, group = unique("stop-outage"), unique("group")
    with broker_behind_a_proxy(tmp_path) as (outage, bootstrap):
        the_relay = relay(pg_url, bootstrap, topic, tmp_path / "relay.log", {}).start()
        try:
            wait_until(lambda: _cursor(pg_url, topic) == head, "the relay to publish")
        finally:
            assert the_relay.stop() == 0, the_relay.output
        env = {"DAYBOOK_FAULTS": "worker.after_commit:1:pause", "DAYBOOK_FAULTS_DIR": str(tmp_path)}
        process = worker(pg_url, bootstrap, topic, group, tmp_path / "w.log", env).start()
        try:
            wait_until(paused(tmp_path, "worker.after_commit").exists, "the first batch")
            outage.cut()
            paused(tmp_path, "worker.after_commit").unlink()
            time.sleep(3)
            assert process.proc is not None and process.proc.poll() is None, process.output
            started = time.monotonic()
            code = process.stop()  # SIGTERM; SIGKILL after 30 s
            took = time.monotonic() - started
        finally:
            outage.restore()
            if process.proc is not None and process.proc.poll() is None:
                process.kill()
        assert (code, took < STOP_GRACE_SECONDS + 7) == (0, True), (code, took)
        assert "exiting without committing the last offsets" in process.output
        write_money(ledger, accounts, 20, seed=2)
        head = ledger.head()
        the_relay = relay(pg_url, bootstrap, topic, tmp_path / "relay2.log", {}).start()
        process = worker(pg_url, bootstrap, topic, group, tmp_path / "w2.log", {}).start()
        try:
            caught_up_and_live(pg_url, group, topic, head)
        finally:
            assert process.stop() == 0, process.output
            assert the_relay.stop() == 0, the_relay.output
    ledger.close()


#: The batch idle limit a frozen worker is started with here (a test-only variable; the
#: workers' own limit is ``BATCH_IDLE_LIMIT_SECONDS``).
FROZEN_IDLE_LIMIT = 5


def test_a_worker_frozen_mid_batch_lets_another_take_its_partitions_over(
    pg_url: str, pg_admin_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A worker frozen (SIGSTOP, a paused VM) inside a batch's transaction held its
    partitions' progress rows locked until TCP gave its connection up, hours later: the
    worker the group gave its partitions retried their batches all that while. The
    batch's transaction now ends on the server once idle past its limit (here, a few
    seconds), and the other worker applies everything; woken, the first one loses its
    batch, nothing applied twice."""
    ledger = open_ledger(pg_url)
    accounts = open_accounts(ledger, 20)
    write_money(ledger, accounts, 1500)
    topic, group = unique("frozen"), unique("group")
    env = {
        "DAYBOOK_FAULTS": "worker.before_commit:2:pause",
        "DAYBOOK_FAULTS_DIR": str(tmp_path),
        BATCH_IDLE_LIMIT_VARIABLE: str(FROZEN_IDLE_LIMIT),
    }
    the_relay = relay(pg_url, kafka_bootstrap, topic, tmp_path / "relay.log", {}).start()
    frozen = worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "w1.log", env).start()
    other: Daybook | None = None
    held = paused(tmp_path, "worker.before_commit")
    try:
        wait_until(held.exists, "the first worker inside its second batch")
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)
        other = worker(pg_url, kafka_bootstrap, topic, group, tmp_path / "w2.log", {}).start()
        head = ledger.head()
        wait_until(lambda: applied(pg_url, group, topic) == head, "the other worker's batches")
        frozen.proc.send_signal(signal.SIGCONT)
        held.unlink()
    finally:
        held.unlink(missing_ok=True)
        if frozen.proc is not None:
            frozen.proc.send_signal(signal.SIGCONT)
        for each in (other, frozen, the_relay):
            if each is not None:
                each.stop()
    assert tables(pg_url) == reference_tables(pg_url, pg_admin_url)
    ledger.close()
