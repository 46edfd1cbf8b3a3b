"""The faust-streaming app: one agent that feeds ``StreamApplier`` with batches.

faust acknowledges events even when an agent raises: ``Stream.take_events`` acks every event
of a batch in a ``finally:`` after the agent body, whether the body finished, raised, or was
cancelled (a worker stopping, a crash of the agent), and the acked offsets are committed at
the next commit tick (faust/streams.py, ``take_events``/``take``). An event whose batch never
reached the database would then be lost. So the agent takes no events from faust's stream at
all: it receives whole fetches (``compat.faust.drain_in_batches``, which also removes faust's
per-message delivery cost) and acknowledges each message itself, only after the transaction
that applied (or parked) it committed; the body never raises for an event it could not apply
(that is parked), and waits out database outages (retrying the same batch) instead of
raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import faust
import psycopg
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from faust.types import TP
from faust.types import Message as FaustMessage

from daybook.infrastructure.compat import aiokafka as aiokafka_compat
from daybook.infrastructure.compat import faust as faust_compat
from daybook.infrastructure.lifecycle import Health, ServiceState
from daybook.infrastructure.observability import metrics, tracing
from daybook.infrastructure.observability.logs import LIMITED_AT_SOURCE
from daybook.infrastructure.readmodels.checkpoints import PartitioningMismatch
from daybook.infrastructure.readmodels.location import readmodel_url
from daybook.infrastructure.streaming.broker import (
    DEFAULT_PARTITIONS,
    DEFAULT_TOPIC,
    bootstrap_servers,
    dead_letter_topic,
    ensure_topic,
    topic_partitions,
)
from daybook.infrastructure.streaming.faults import crash_point
from daybook.infrastructure.streaming.progress import DEAD_LETTER_TABLE
from daybook.infrastructure.streaming.relay import read_cursor
from daybook.infrastructure.streaming.worker import (
    LETTERS_PER_CLAIM,
    DeadLetter,
    Message,
    StreamApplier,
)
from daybook.infrastructure.transient import causes, first_line, is_transient
from daybook.infrastructure.urls import postgres_params
from daybook.projections import ALL
from daybook.projections.model import Projection

log = logging.getLogger("daybook.worker")


@dataclass(frozen=True)
class WorkerConfig:
    store_url: str
    broker_url: str
    topic: str = DEFAULT_TOPIC
    partitions: int = DEFAULT_PARTITIONS
    group: str = "daybook-projections"
    #: Read models go here (default: beside the events).
    readmodels_url: str | None = None
    batch_size: int = 2000
    #: Seconds a batch short of ``batch_size`` waits for more fetches (see ``fill_batch``).
    #: 0 by default: a message applied at once is worth more to a read model's freshness
    #: than the commit saved (under load, fetches pile up and batches fill on their own).
    batch_wait: float = 0.0
    web_port: int = 0
    #: Short enough that a killed worker's partitions move on within seconds.
    session_timeout: float = 6.0
    heartbeat_interval: float = 1.0
    commit_interval: float = 0.5
    #: Longest a fetch waits on the broker for new messages (see ``_shorten_fetch_wait``).
    fetch_wait: float = 0.05


def writer_name() -> str:
    """This worker's name in its partitions' progress rows: unique per start, not only per
    host and pid. Containers on the host's network share its name and are each pid 1, and
    a worker keeps its cached rows while its partitions' progress names it as their last
    writer: two of one name each took the other's writes for its own, and wrote balances
    from stale rows."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def make_app(
    config: WorkerConfig,
    projections: Sequence[Projection] = ALL,
    *,
    datadir: str,
    stop: Callable[[], Awaitable[None]] | None = None,
) -> tuple[faust.App, StreamApplier]:
    """The faust app (its id is the consumer group) and the applier its agent drives.

    ``datadir`` is faust's data directory; the caller owns it (``run_worker`` removes it).
    ``stop`` stops whatever runs the app (``run_worker``: the faust worker; by default the
    app) once a failure no retry cures has stopped the agent.
    """
    app = faust.App(
        config.group,
        broker=f"kafka://{bootstrap_servers(config.broker_url)}",
        # Tansu does not filter aborted transactions, so no exactly_once; the progress rows
        # make redelivery harmless anyway.
        processing_guarantee="at_least_once",
        # State lives in PostgreSQL; faust tables are not used (restarts stalled in their
        # recovery), so its store and data dir are throwaway.
        store="memory://",
        datadir=datadir,
        web_enabled=config.web_port > 0,
        web_port=config.web_port or 6066,
        topic_partitions=config.partitions,
        topic_replication_factor=1,
        broker_session_timeout=config.session_timeout,
        broker_heartbeat_interval=config.heartbeat_interval,
        # faust requires the request timeout to be at least the session timeout.
        broker_request_timeout=max(20.0, config.session_timeout + 1),
        broker_commit_interval=config.commit_interval,
        broker_commit_every=config.batch_size,
        broker_max_poll_records=config.batch_size,
        stream_buffer_maxsize=max(4096, config.batch_size * 2),
        consumer_auto_offset_reset="earliest",
    )
    _shorten_fetch_wait(app, config.fetch_wait)
    # Whole fetches of the topic, for the agent; two at most in flight (back-pressure on the
    # fetch loop while a batch is applied).
    handoff: asyncio.Queue[list[FaustMessage]] = asyncio.Queue(maxsize=2)
    faust_compat.drain_in_batches(app, config.topic, handoff)
    topic = app.topic(
        config.topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=config.partitions,
    )
    dead_letters = app.topic(
        dead_letter_topic(config.topic),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=1,
    )
    applier = StreamApplier(
        config.readmodels_url or readmodel_url(config.store_url),
        projections,
        group=config.group,
        topic=config.topic,
        partitions=config.partitions,
        writer=writer_name(),
        head=LogHead(config.store_url),
        published=lambda: _relay_partitions(config),
    )

    async def publish_dead_letters() -> None:
        """Publish the group's unpublished dead letters no other worker is publishing, a
        claim at a time (``StreamApplier.claim_dead_letters``), each claim marked published
        once the broker acknowledged all of it; on a failure, released unpublished."""
        while True:
            letters = await asyncio.to_thread(applier.claim_dead_letters)
            try:
                for letter in letters:
                    await publish_letter(letter)
                await asyncio.to_thread(applier.mark_published, letters)
            except BaseException:
                # The connection holds the claim: closed, its locks go with it.
                await asyncio.to_thread(applier.close)
                raise
            if len(letters) < LETTERS_PER_CLAIM:
                return

    async def publish_letter(letter: DeadLetter) -> None:
        """Send ``letter``; without its message if the message is too large to send (see
        ``too_large``)."""
        headers = letter_headers(letter, config.group)
        try:
            await send_letter(letter, letter.value, headers)
        except Exception as error:
            if not too_large(error):
                raise
            # Sent whole, the letter would be refused at every try, and the worker stop at
            # every start: the message stays in the dead-letter table.
            log.error(
                "worker: the dead letter at position %d is too large for the broker (%d bytes:"
                " %s); published without its message, which %s keeps",
                letter.position, len(letter.value), first_line(error), DEAD_LETTER_TABLE,
                extra={LIMITED_AT_SOURCE: True},  # once per letter: each is said
            )  # fmt: skip
            cut = f"{len(letter.value)} bytes, too large to send; kept in {DEAD_LETTER_TABLE}"
            await send_letter(letter, b"", [*headers, ("cut", cut.encode())])

    async def send_letter(letter: DeadLetter, value: bytes, headers: list[Any]) -> None:
        await app.producer.send_and_wait(
            dead_letters.get_topic_name(),
            str(letter.position).encode(),
            value,
            partition=None,
            timestamp=None,
            headers=headers,
        )

    async def backoff_unless_suspended(delay: float) -> None:
        """Wait ``delay`` seconds before the batch is tried again; raise ``_Abandoned`` as
        soon as faust suspends the flow of messages (a stop, or a rebalance taking the
        partitions away). Both wait for every fetched message to be acknowledged first
        (``wait_empty``): a batch retried through an outage would hold them up for as long
        as the outage lasts, SIGTERM and SIGINT included."""
        waited = 0.0
        while app.flow_control.is_active():
            if waited >= delay:
                return
            await asyncio.sleep(min(FLOW_CHECK_SECONDS, delay - waited))
            waited += FLOW_CHECK_SECONDS
        raise _Abandoned

    #: Whether dead letters recorded (before a crash, or by a batch) may await publishing.
    letters_pending = True
    #: Whether the checks at the agent's start (``StreamApplier.refuse_at_start``) met an
    #: outage and are still to pass: until a batch goes through, they are what an idle
    #: worker's probe runs (``next_fetch``), so that one its group cannot serve still stops.
    start_checks_pending = False

    async def publish_pending_letters() -> None:
        """Publish the dead letters recorded and not yet published (each once: those a
        batch just parked among them): at the agent's start, and after a batch that parked
        some or while some are left. An outage is left to the batches, which wait it out
        as a stop and a rebalance require: raised out of the agent, it had faust restart
        the agent every 5 s (a traceback each time, health saying it ran) and a stop after
        that waited for ever; waited out here, with the fetches piling up behind the agent,
        a stop waited for ever too. ``_Stopped`` after a failure no retry cures (judged:
        FAILED, with the reason)."""
        nonlocal letters_pending
        try:
            await publish_dead_letters()
        except Exception as error:
            if not is_transient(error):
                applier.supervisor.judge(error)
                raise _Stopped from error
            letters_pending = True  # (their claim ended already: released or closed)
            log.warning("worker: dead letters could not be published yet (%s); trying again"
                        " after the next batch", first_line(error))  # fmt: skip
            return
        letters_pending = False

    async def refuse_unlike_broker() -> None:
        """Raise ``PartitioningMismatch`` if the topic has another partition count on the
        broker than this worker runs with: faust leaves a topic that exists as it is, and
        Kafka hands the group the topic's partitions, whatever the worker was told. Where
        no relay cursor counts them (none ran yet, or its event store is elsewhere), only
        the broker can say. A broker that cannot say just now leaves the comparison to the
        relay's cursor (the worker's batches need the broker anyway)."""
        try:
            found = await topic_partitions(bootstrap_servers(config.broker_url), config.topic)
        except Exception as error:
            log.warning(
                "worker: the broker did not say how many partitions %s has (%s); comparing "
                "--partitions with the relay's cursor only", config.topic, first_line(error),
            )  # fmt: skip
            return
        if found is not None and found != config.partitions:
            raise PartitioningMismatch.of_topic(
                config.topic, found, "the broker has topic", config.partitions
            )

    async def pass_pending_start_checks() -> None:
        """The checks at the start, if they met an outage and are still to pass: a worker
        its group cannot serve (another partitioning, versions it does not own) must not
        apply a batch, nor say it runs, first. Raises their refusal or failure."""
        nonlocal start_checks_pending
        if start_checks_pending:
            await asyncio.to_thread(applier.refuse_at_start)
            start_checks_pending = False

    async def apply_until_done(messages: list[Message]) -> None:
        """Apply one batch, retrying through database outages (with backoff and jitter);
        never raises for data (that is parked). A failure no retry cures stops the worker:
        its health says FAILED and why, and ``run_worker`` reports it."""
        supervisor = applier.supervisor
        while True:
            try:
                await pass_pending_start_checks()
                result = await asyncio.to_thread(applier.apply, messages)
                break
            except Exception as error:
                await asyncio.to_thread(applier.close)
                delay = supervisor.judge(error)  # logged, and recorded in its health
                if delay is None:
                    raise _Stopped from error
                # Nothing of the batch in hand is applied: its partitions' lag counts it
                # (and what the broker has beyond it) rather than freeze at the last figure.
                hold_lag(messages)
                await backoff_unless_suspended(delay)
        supervisor.succeeded()
        if letters_pending or result.parked:
            await publish_pending_letters()
        for partition in result.offsets:
            if partition not in result.waiting:
                held_back.pop(partition, None)
            elif (first := result.waiting[partition]) is not None:
                held_back[partition] = first  # a gap that began in this batch
            elif partition not in held_back:
                # Waiting since before this worker held the partition (started again, or
                # given it in a rebalance): from the first message of it this worker fetched.
                held_back[partition] = min(m.offset for m in messages if m.partition == partition)
        measure_lag(result.offsets)

    #: Partitions that reached the end of what the broker had (see ``measure_lag``).
    caught_up: set[int] = set()
    #: Partitions whose lag this worker reports (see ``forget_lag_of_lost_partitions``).
    lag_reported: set[int] = set()
    #: Per partition it holds, the offset of the last message applied (see ``hold_lag``).
    applied: dict[int, int] = {}
    #: Per partition waiting for a gap: the offset of the first message the gap held back
    #: (acknowledged, never applied): lag counts from there until the gap ends.
    held_back: dict[int, int] = {}

    def measure_lag(offsets: dict[int, int]) -> None:
        """Per partition of the batch: messages the broker has beyond the last one applied
        (from the highwater of the consumer's latest fetch, when it knows one). A partition
        that reaches the end is said once, and again only after a backlog of a batch. A
        partition taken away meanwhile (a rebalance that did not wait for this batch) is
        not reported: its new owner reports it."""
        consumer: Any = app.consumer
        try:
            held = {tp.partition for tp in consumer.assignment() if tp.topic == config.topic}
        except Exception:  # the consumer restarting
            return
        for partition, offset in offsets.items():
            if partition not in held:
                continue
            try:
                highwater = consumer.highwater(TP(config.topic, partition))
            except Exception:  # no fetch of that partition yet, or the consumer restarting
                continue
            if not isinstance(highwater, int):
                continue
            lag = max(0, highwater - min(offset + 1, held_back.get(partition, offset + 1)))
            metrics.WORKER_LAG_EVENTS.labels(config.group, str(partition)).set(lag)
            lag_reported.add(partition)
            applied[partition] = offset
            if lag == 0 and partition not in caught_up:
                caught_up.add(partition)
                log.info("worker: partition %d caught up at offset %d", partition, offset)
            elif lag >= config.batch_size:
                caught_up.discard(partition)

    def hold_lag(messages: list[Message]) -> None:
        """While a batch cannot be applied: the lag of every partition it holds, from the
        last message applied there (for a partition of the batch met first, the message
        before the batch's first): the broker's backlog grows on all of them meanwhile."""
        first: dict[int, int] = {}
        for message in messages:
            first[message.partition] = min(first.get(message.partition, message.offset),
                                           message.offset)  # fmt: skip
        offsets = dict(applied)
        offsets.update({partition: offset - 1 for partition, offset in first.items()})
        measure_lag(offsets)

    def forget_lag_of_lost_partitions(sender: Any, /, *args: Any, **kwargs: Any) -> None:
        """After a rebalance (faust's ``on_partitions_assigned`` signal, whose argument is
        this worker's whole new assignment), stop reporting the lag of the partitions it no
        longer holds. Their last figure would stay for good beside the new owner's, and a
        lag alert on it fire for ever."""
        assigned: set[TP] = args[0]
        held = {tp.partition for tp in assigned if tp.topic == config.topic}
        for partition in lag_reported - held:
            with contextlib.suppress(KeyError):  # never reported, or removed already
                metrics.WORKER_LAG_EVENTS.remove(config.group, str(partition))
            lag_reported.discard(partition)
        for partition in set(applied) - held:
            del applied[partition]
        for partition in set(held_back) - held:
            del held_back[partition]

    app.on_partitions_assigned.connect(forget_lag_of_lost_partitions)

    async def next_fetch() -> list[FaustMessage]:
        """The next fetch from ``handoff``. While the worker says it retries with no batch in
        hand (it gave one up on a rebalance during an outage: ``_Abandoned``; or the checks
        at its start met an outage), only a batch that goes through would say it runs
        again, and on idle partitions none comes: so meanwhile, once faust has settled the
        rebalance (the flow resumed, whatever the assignment), the read-model database is
        probed, after a backoff as a batch would be retried (the checks at the start, if
        they are still to pass). Answering, the worker runs again; still away, it keeps
        retrying; a refusal or a failure no retry cures stops it (``_Stopped``)."""
        supervisor = applier.supervisor
        getting = asyncio.ensure_future(handoff.get())
        wait = IDLE_PROBE_SECONDS
        try:
            while supervisor.health().state is ServiceState.RETRYING:
                done, _ = await asyncio.wait({getting}, timeout=wait)
                if done:
                    break
                wait = IDLE_PROBE_SECONDS
                if not app.flow_control.is_active() or app.rebalancing:
                    continue  # stopping, or the partitions not settled yet
                try:
                    if start_checks_pending:
                        await pass_pending_start_checks()
                    else:
                        await asyncio.to_thread(applier.probe)
                except Exception as error:
                    await asyncio.to_thread(applier.close)
                    delay = supervisor.judge(error)  # logged, and recorded in its health
                    if delay is None:
                        raise _Stopped from error
                    wait = max(delay, FLOW_CHECK_SECONDS)
                    continue
                supervisor.recovered()
                if letters_pending:
                    # Letters an outage kept from their topic (at the start, say) would
                    # wait for a batch, which on a quiet topic never comes.
                    await publish_pending_letters()
            return await getting
        except BaseException:
            let_go(getting)
            raise

    def let_go(getting: asyncio.Future[list[FaustMessage]] | None) -> None:
        """A ``handoff.get()`` given up: cancelled if nothing came; if a fetch did, it was
        taken off the queue never to be applied (stopping, or failed), and faust must not
        wait for it."""
        if getting is None:
            return
        if not getting.done():
            getting.cancel()
        elif not getting.cancelled() and getting.exception() is None:
            faust_compat.untrack(app, getting.result())

    async def fill_batch(fetched: list[FaustMessage]) -> None:
        """Add to ``fetched`` (a batch's first fetch) the fetches that come within
        ``batch_wait`` seconds of it, until it holds ``batch_size`` messages or more: fewer,
        larger transactions when messages trickle in (each costs a commit). It stops
        waiting as soon as faust suspends the flow of messages (a stop, or a rebalance):
        both wait for the batch to be acknowledged. A fetch that came meanwhile is taken
        whatever the time (0: only those)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.batch_wait
        getting: asyncio.Future[list[FaustMessage]] | None = None
        try:
            while len(fetched) < config.batch_size:
                if getting is None and not handoff.empty():
                    fetched.extend(handoff.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0 or not app.flow_control.is_active() or app.rebalancing:
                    break
                getting = getting or asyncio.ensure_future(handoff.get())
                done, _ = await asyncio.wait({getting}, timeout=min(FLOW_CHECK_SECONDS, left))
                if done:
                    fetched.extend(getting.result())
                    getting = None
        except BaseException:
            # Taken off the queue, never to be applied (stopping): faust must not wait for
            # them.
            faust_compat.untrack(app, fetched)
            raise
        finally:
            let_go(getting)  # (on the way out without failing: a wait that timed out)

    # Taken while a batch is applied and acknowledged, so that a restart happens between
    # batches (a restart mid-batch would be safe too: the transaction rolls back).
    batch_lock = asyncio.Lock()
    republished_at_start = _relay_republished(config)

    # faust annotates App.timer as returning a bare Callable.
    @app.timer(interval=2.0)  # type: ignore[untyped-decorator]
    async def _restart_after_broker_data_loss() -> None:
        """Restart this worker in place once the broker has lost its data (see ``restart``).

        The sign is the relay's cursor: it re-published the log because the broker
        acknowledged messages at offsets it had acknowledged before. (Not the consumer's
        position against the high watermark: Tansu's high watermark lags what it has
        acknowledged, so a healthy worker looks "past the end" now and then.)"""
        republished = await asyncio.to_thread(_relay_republished, config)
        if republished is not None and republished > (republished_at_start or 0):
            async with batch_lock:
                restart(app, "the broker lost its data (restarted on memory storage?)")

    async def stop_worker() -> NoReturn:
        """Stop the worker as SIGTERM does, and wait here to be cancelled. (An agent that
        raises is restarted by faust's supervisor, and a worker stopping while that happens
        waits forever.)"""
        stopping = asyncio.ensure_future((stop or app.stop)())
        await asyncio.shield(stopping)
        await asyncio.Event().wait()
        raise AssertionError("unreachable: the agent is cancelled")

    @app.agent(topic, name="daybook-project")
    async def _project(stream: Any) -> None:
        # The agent's stream is what subscribes faust to the topic (the Conductor); the
        # messages themselves come whole fetches at a time from ``drain_in_batches``.
        nonlocal start_checks_pending
        del stream
        try:
            await publish_pending_letters()
        except _Stopped:
            while not handoff.empty():  # fetched already: faust must not wait for them
                faust_compat.untrack(app, handoff.get_nowait())
            await stop_worker()
        try:
            await refuse_unlike_broker()
            await asyncio.to_thread(applier.refuse_at_start)
        except Exception as error:
            # Judged here, not left to the first batch, which on a quiet topic never comes:
            # a refusal (one line) or a failure no retry cures stops the worker; an outage
            # has it say it retries, with the reason, until a batch goes through or, idle,
            # the checks pass (``next_fetch``).
            await asyncio.to_thread(applier.close)
            if applier.supervisor.judge(error) is None:
                await stop_worker()
            start_checks_pending = True
        consumer = app.consumer
        while True:
            try:
                fetched = await next_fetch()
            except _Stopped:
                while not handoff.empty():
                    faust_compat.untrack(app, handoff.get_nowait())
                await stop_worker()
            await fill_batch(fetched)
            # Fetched before a rebalance: not ours to acknowledge any more; faust seeks the
            # partitions' new owners back to the committed offsets, so they come again.
            generation = app.consumer_generation_id
            current = [m for m in fetched if m.generation_id == generation]
            faust_compat.untrack(app, (m for m in fetched if m.generation_id != generation))
            if not current:
                continue
            # A message without a value (a tombstone) is no envelope: parked as such.
            messages = [
                Message(m.partition, m.offset, m.value or b"", traceparent_header(m.headers))
                for m in current
            ]
            # No faust stream sees these events: faust's livelock check learns here that
            # their partitions are processed (it called them stalled otherwise).
            faust_compat.record_stream_inbound(app, {m.tp for m in current})
            async with batch_lock:
                try:
                    await apply_until_done(messages)
                except BaseException as error:
                    # Stopping (or failed): nothing of this batch, nor of the fetches waiting
                    # behind it, will be acknowledged here; faust must not wait for them
                    # (they come again from the committed offsets).
                    faust_compat.untrack(app, current)
                    while not handoff.empty():
                        faust_compat.untrack(app, handoff.get_nowait())
                    if isinstance(error, _Abandoned):
                        continue  # faust stops the worker, or gives it other partitions
                    if not isinstance(error, _Stopped):
                        raise
                    await stop_worker()
                ack = consumer.ack
                for message in current:
                    ack(message)

    return app, applier


def too_large(error: BaseException) -> bool:
    """Whether sending a message failed for its size, which no retry changes: larger than
    the worker's producer may send (faust's ``producer_max_request_size``, 1,000,000 bytes,
    where the relay's producer may send 1 MiB), or than the topic takes. A message the
    worker got from its topic can be that large: it came from the relay, or from a producer
    that is not daybook's."""
    return any(
        isinstance(cause, MessageSizeTooLargeError | RecordListTooLargeError | RecordTooLargeError)
        for cause in causes(error)
    )


#: The most of a letter's error its ``error`` header carries (the row keeps it whole).
ERROR_HEADER_CHARS = 1000


def letter_headers(letter: DeadLetter, group: str) -> list[tuple[str, bytes]]:
    """A dead letter's headers: why, the group, and where the message was (with the key,
    the letter's position, what tells a letter sent twice from two letters)."""
    return [
        # Cut: an error's text can quote the message (``BadEnvelope`` its ``v``), whole.
        ("error", letter.error[:ERROR_HEADER_CHARS].encode()),
        ("group", group.encode()),
        ("partition", str(letter.partition).encode()),
        ("offset", str(letter.offset).encode()),
    ]


def traceparent_header(headers: Any) -> str | None:
    """The ``traceparent`` header of a Kafka message (faust gives headers as pairs, or a
    mapping), if it has one."""
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in pairs:
        if key == "traceparent" and value:
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None


class LogHead:
    """The event log's head, read from the event store (the read models may live
    elsewhere): a version the workers build starts serving once it has reached it (and is
    not behind the version serving). None while the event store cannot be reached (asked
    again after the next batch)."""

    def __init__(self, store_url: str) -> None:
        self.conninfo = postgres_params(store_url).conninfo()
        self._conn: psycopg.Connection[Any] | None = None

    def __call__(self) -> int | None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.conninfo, autocommit=True)
            row = self._conn.execute(
                "SELECT COALESCE(max(notification_id), 0) FROM daybook_events"
            ).fetchone()
            return int(row[0]) if row else None
        except (psycopg.Error, OSError):
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            return None


def _shorten_fetch_wait(app: faust.App, seconds: float) -> None:
    """Make the consumer's fetches wait at most ``seconds`` on the broker.

    faust's aiokafka driver hard-codes ``fetch_max_wait_ms=1500``. Kafka answers such a long
    poll as soon as a message arrives, but the Tansu broker holds it for the whole wait, so
    commit-to-row latency grew with that wait (``scripts/bench_streaming.py`` reports it).
    On Kafka the cost is an empty fetch round trip per ``seconds`` while idle.
    """
    faust_compat.customize_worker_consumer(
        app, lambda consumer: aiokafka_compat.set_fetch_max_wait(consumer, seconds)
    )


def _relay_partitions(config: WorkerConfig) -> int | None:
    """The partition count the relay publishes the topic with, from its cursor in the event
    store (None: no relay has published the topic). An event store that cannot be read
    raises: the check waits for it, as a batch waits for the read models."""
    cursor = read_cursor(config.store_url, config.topic)
    return None if cursor is None else cursor.partitions


def _relay_republished(config: WorkerConfig) -> int | None:
    """How many times the relay re-published the log after broker data loss (None if the
    event store cannot be read just now)."""
    try:
        cursor = read_cursor(config.store_url, config.topic)
    except (psycopg.Error, OSError):
        return None
    return cursor.republished if cursor is not None else 0


def restart(app: faust.App, reason: str) -> NoReturn:
    """Replace this worker process with a fresh one (same pid, same command line).

    The one place that works around faust after a broker lost its data. The re-published
    messages get offsets the consumer has already passed, and faust's state says otherwise:

    - offset commits go through aiokafka's ``GroupCoordinator.commit_offsets``, which
      retries retriable errors without a deadline. The restarted Tansu answered
      ``UNKNOWN_TOPIC_OR_PARTITION`` (retriable) for the topic it had re-created (see
      ``streaming.relay.BrokerLostData``), and faust's fetch loop awaits that commit
      (``Consumer._drain_messages`` commits every ``broker_commit_every`` acks, and
      ``maybe_wait_for_commit_to_finish`` waits for the one in flight): it stops fetching;
    - positions past the end of the emptied partitions: Kafka would answer
      OFFSET_OUT_OF_RANGE and aiokafka would reset them, Tansu returns nothing;
    - faust's own bookkeeping is above the new offsets: ``_drain_messages`` drops messages
      below the last read offset ("DROPPED MESSAGE") unless a seek reset it, and
      ``_should_commit`` refuses offsets below ``_committed_offset``.

    A fresh process has none of that state: it joins the group on the new broker, finds no
    committed offsets, reads from the earliest offset, and the progress rows turn what it
    applied before into duplicates. Stopping faust gracefully could wait forever on that
    commit, so this ``exec``s at once, like a crash at a batch boundary: the caller holds
    the batch lock, and the database connections close with the old process image.
    """
    log.warning("worker: %s; restarting this worker in place", reason)
    shutil.rmtree(str(app.conf.datadir), ignore_errors=True)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


class _Stopped(Exception):
    """The worker's agent stopped on a failure no retry cures (see its health)."""


class _Abandoned(Exception):
    """A batch waiting out an outage given up, unacknowledged, because faust stops the
    worker or rebalances: its messages come again from the committed offsets, to whoever
    owns their partitions then (the progress rows skip what was applied). The worker says
    it retries until a batch goes through or, idle, its database answers (``next_fetch``)."""


#: How often a batch waiting out an outage looks whether faust has suspended the flow.
FLOW_CHECK_SECONDS = 0.05

#: How long a worker that says it retries, with no batch in hand, waits for one before it
#: probes its database (then as long as its backoff says; see ``next_fetch``).
IDLE_PROBE_SECONDS = 1.0


def _broker_failed(error: BaseException | None) -> bool:
    """Whether ``error`` is the broker failing a start: a retriable Kafka error."""
    return isinstance(error, KafkaError) and is_transient(error)


class _NoTracebackForAnOutage(logging.Filter):
    """faust logs a failed start with its traceback (``Error: ...``), as it would a bug. A
    start that failed for want of the broker is an outage: the worker starts again and
    says why (``_again_if_the_broker_went``), so the line stays and the traceback goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _broker_failed(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


_NO_TRACEBACK_FOR_AN_OUTAGE = _NoTracebackForAnOutage()

#: This worker's starts in place after failed starts: how many in a row, and when the first
#: failed, as ``COUNT:FIRST`` (see ``_again_if_the_broker_went``). FIRST is read on the
#: monotonic clock (``CLOCK_MONOTONIC``, which an ``exec`` of the same process keeps): on
#: the wall clock, NTP stepping it back an hour stretched the startup wait by that hour.
_STARTS_VARIABLE = "DAYBOOK_WORKER_FAILED_STARTS"


@dataclass(frozen=True)
class _FailedStarts:
    count: int = 0
    first: float = 0.0

    @classmethod
    def taken_from_environment(cls) -> _FailedStarts:
        """Read once, when ``run_worker`` begins, and taken out of the environment: a worker
        that starts well begins again from none."""
        failed = cls.in_environment()
        os.environ.pop(_STARTS_VARIABLE, None)
        return failed

    @classmethod
    def in_environment(cls) -> _FailedStarts:
        count, _, first = os.environ.get(_STARTS_VARIABLE, "").partition(":")
        try:
            return cls(int(count), float(first))
        except ValueError:
            return cls()


def waited_at_start() -> float:
    """Seconds since this worker's first failed start, if it was started again in place
    (0 otherwise): spent from its startup wait, which counts from that first failure."""
    failed = _FailedStarts.in_environment()
    return max(0.0, time.monotonic() - failed.first) if failed.count else 0.0


def _again_if_the_broker_went(
    app: faust.App, worker: faust.Worker, before: _FailedStarts, startup_wait: float | None
) -> None:
    """faust's start failed. If the broker failed it (it answered the preflight check a
    moment before: it went in between, or came up only halfway), start this worker again in
    place: the new process waits at its preflight for the broker to answer, as a worker
    started during the outage does. Any other failure (a web port taken, a database error)
    ends the worker, as before; so does a stop signal that came meanwhile, and a startup
    wait that has run out, counted from the first failed start (0: never start again).
    Pauses between such starts double up to 30 s, so a broker that answers the check and
    fails every start is not hammered."""
    error = faust_compat.start_failure(worker)
    if not _broker_failed(error):
        return
    if faust_compat.stop_requested(worker) or startup_wait == 0:
        return
    now = time.monotonic()
    first = before.first if before.count else now
    if startup_wait is not None and now - first >= startup_wait:
        log.warning(
            "worker: the broker failed every start for %.0f s (the startup wait is %g s): "
            "stopping", now - first, startup_wait,
        )  # fmt: skip
        return
    os.environ[_STARTS_VARIABLE] = f"{before.count + 1}:{first!r}"

    def stop(signum: int, frame: object) -> None:
        log.warning("worker: stopped before starting again (signal %d)", signum)
        raise SystemExit(0)

    # faust's handlers went with its loop: a stop during the pause ends the worker cleanly.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    time.sleep(min(2.0**before.count, 30.0))
    restart(app, f"the broker failed the worker's start ({error})")


#: Seconds a worker told to stop (SIGTERM, SIGINT) gives faust to stop before it exits
#: anyway. faust's stop commits the consumed offsets last, and aiokafka waits for the
#: group's coordinator without a deadline: with the broker away, a stop waited for as long
#: as the outage lasted (till a SIGKILL). Leaving without that commit is safe: every batch
#: acknowledged is in the database, and what comes again is skipped as duplicates.
STOP_GRACE_SECONDS = 8.0


def _exit_if_a_stop_hangs(
    worker: faust.Worker, applier: StreamApplier, stopped: threading.Event, datadir: str
) -> None:
    """Watch for a stop signal; if the worker has not stopped ``STOP_GRACE_SECONDS`` after
    it, say so and end the process: exit status 0, the stop asked for, unless the worker
    had failed (1, with the reason, as ``daybook worker`` says it)."""
    while not faust_compat.stop_requested(worker):
        if stopped.wait(0.2):
            return
    if stopped.wait(STOP_GRACE_SECONDS):
        return
    log.warning(
        "worker: still stopping after %g s (the broker away?); exiting without committing"
        " the last offsets (their messages come again, and are skipped as duplicates)",
        STOP_GRACE_SECONDS,
    )
    shutil.rmtree(datadir, ignore_errors=True)
    tracing.flush_tracing(timeout_millis=2_000)  # no atexit after os._exit
    for handler in logging.getLogger().handlers:
        handler.flush()
    code = 0
    if _failed(applier):
        print(f"daybook worker: stopped: {applier.supervisor.health().error}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _failed(applier: StreamApplier) -> bool:
    return applier.supervisor.health().state is ServiceState.FAILED


def faust_worker(app: faust.App, *, banner: bool = True) -> faust.Worker:
    """faust's worker for ``app``, logging at INFO if daybook's logger is, else WARN, through
    the root logger's handlers as they are: daybook's (``configure_logging``), with their
    format, rate limit and redaction, for JSON and console logs alike. ``banner``: faust's
    start-up table on stdout (not for JSON logs, whose stream it would break)."""
    level = "INFO" if log.isEnabledFor(logging.INFO) else "WARN"
    # At its start faust (mode's ``setup_logging``) clears the root logger's handlers,
    # applies ``logging_config`` (by default, its own handler and format: here, nothing), then
    # adds ``loghandlers``: daybook's handlers stay the only ones.
    app.conf.loghandlers = list(logging.getLogger().handlers)
    return faust.Worker(
        app,
        loglevel=level,
        quiet=not banner,
        logging_config={"version": 1, "disable_existing_loggers": False},
    )


#: A worker's faust data directory is named so, then its process id, a dash and a random part.
DATADIR_PREFIX = "daybook-faust-"


def remove_dead_workers_datadirs(root: Path) -> list[Path]:
    """Remove, from ``root``, the faust data directories of this user's workers whose process
    has ended; those removed. A worker killed outright (SIGKILL, the kernel's OOM killer)
    runs no clean-up, and each such kill would leave one for good. One whose process is
    alive, or whose id a live process has taken since, is left alone."""
    removed = []
    for path in root.glob(f"{DATADIR_PREFIX}*-*"):
        pid = path.name[len(DATADIR_PREFIX) :].split("-", 1)[0]
        try:
            owned = path.is_dir() and path.stat().st_uid == os.getuid()
        except OSError:
            continue  # gone meanwhile (removed by its worker, or by another one starting)
        if owned and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def _create_topic_if_missing(config: WorkerConfig) -> None:
    """Create the topic with this worker's partition count if nobody has: the consumer's
    first metadata request would have the broker create it with a default of its own
    (Kafka's ``auto.create.topics.enable``, with ``num.partitions``; the Tansu test broker's
    4), and a relay started after it refused the topic. A topic with another count is
    refused by the worker's start checks, and a broker that does not answer by its start:
    neither is judged here."""
    # A loop of its own, never made current: faust's is set up already, and asyncio.run
    # would leave the thread with none.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(
            ensure_topic(bootstrap_servers(config.broker_url), config.topic, config.partitions)
        )
    except Exception as error:  # judged by the start checks and faust's start (above)
        log.debug("worker: creating topic %s: %s", config.topic, first_line(error))
    finally:
        loop.close()


def run_worker(
    config: WorkerConfig,
    projections: Sequence[Projection] = ALL,
    *,
    banner: bool = True,
    startup_wait: float | None = None,
) -> Health:
    """Run one worker in this process until SIGINT/SIGTERM (faust's own worker loop), or
    until a failure no retry cures; returns its final health.

    The body of ``daybook worker``: faust's worker takes over the process (it installs
    signal handlers, sets up logging, and exits with ``SystemExit`` when stopped). faust's
    lines go through the root logger's handlers as they are (daybook's: JSON or console
    lines, rate-limited and redacted), never faust's own (``faust_worker``); ``banner``:
    faust's start-up table (left out for ``--log-format json``). ``startup_wait``: how long
    a broker that fails faust's start is waited for (see ``_again_if_the_broker_went``;
    None: until it answers).
    """
    failed_starts = _FailedStarts.taken_from_environment()
    # faust's data directory is unused (memory store, no tables) but required. It goes
    # when the worker stops, also by SystemExit; ``restart`` removes it before its exec.
    # One of a worker killed outright is removed by the next worker that starts.
    remove_dead_workers_datadirs(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(
        prefix=f"{DATADIR_PREFIX}{os.getpid()}-", ignore_cleanup_errors=True
    ) as datadir:
        workers: list[faust.Worker] = []
        app, applier = make_app(
            config, projections, datadir=datadir, stop=lambda: workers[0].stop()
        )
        worker = faust_worker(app, banner=banner)
        workers.append(worker)
        worker.logger.addFilter(_NO_TRACEBACK_FOR_AN_OUTAGE)
        applier.supervisor.move(ServiceState.RUNNING)
        stopped = threading.Event()
        threading.Thread(
            target=_exit_if_a_stop_hangs,
            args=(worker, applier, stopped, datadir),
            name="daybook-stop-watch",
            daemon=True,
        ).start()
        _create_topic_if_missing(config)
        try:
            crash_point("worker.start")  # the broker may go here (fault tests)
            worker.execute_from_commandline()
        except SystemExit as exit:
            if exit.code not in (None, 0) and not _failed(applier):
                _again_if_the_broker_went(app, worker, failed_starts, startup_wait)
                raise
        except Exception:
            # A crash: the agent recorded why (FAILED); faust re-raises it after shutting down.
            if not _failed(applier):
                raise
        finally:
            stopped.set()
            applier.close()
        applier.supervisor.move(ServiceState.STOPPED)
        return applier.supervisor.health()
