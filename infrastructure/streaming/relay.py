"""The outbox relay: publishes the event log, in order, to a Kafka topic.

The event store's own table is the outbox, so the write side never does a dual write. The
relay reads the log after its cursor, publishes each event keyed by aggregate id (see
``infrastructure.streaming.envelope``), waits until the broker has acknowledged the whole
batch, and only then moves the cursor: a crash anywhere re-publishes part of a batch (the
consumers drop the duplicates), it never skips one.

The cursor row (table ``daybook_relay_cursors``, one row per topic) holds, besides the log
position, two things per partition, moved together in one statement:

- ``chain``: the last log position published to the partition. The next envelope sent there
  carries it as ``prev``, which lets consumers tell duplicates from gaps.
- ``next_offsets``: the Kafka offset the partition's next message should get. Only one relay
  publishes (advisory lock), so an acknowledgement at a *lower* offset means the broker lost
  acknowledged messages: a broker on memory storage restarted (the Tansu build used in tests
  has nothing else), or an unclean leader election. The relay then rewinds the cursor to the
  start of the log and re-publishes everything; consumers skip what they already applied and
  fill their gaps. A *higher* offset means someone else wrote to the topic: harmless.

Every message names the event store it comes from (its identity: ``eventstore.identity``).
A topic is one store's: before publishing, the relay reads the last message of each partition
and refuses (``topic_of_another_store``) when one names another store, since consumers of the
topic would mix two logs' positions.

Only one relay runs per topic: it holds a PostgreSQL advisory lock on a connection it also
uses to write the cursor, so a relay that lost its lock (its connection died) cannot move the
cursor any more. A standby waits on the same lock and takes over when the holder dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, RequestTimedOutError
from eventsourcing.persistence import Notification
from opentelemetry.trace import SpanKind
from psycopg.sql import SQL, Identifier

from daybook.infrastructure import settings
from daybook.infrastructure.compat.aiokafka import stop_producer
from daybook.infrastructure.eventstore.identity import ensure_store_id
from daybook.infrastructure.eventstore.log import EventLog
from daybook.infrastructure.lifecycle import (
    Health,
    Refused,
    RestartPolicy,
    ServiceState,
    Stopping,
    SupervisedTask,
)
from daybook.infrastructure.observability import metrics, tracing
from daybook.infrastructure.own_schema import IN_OWN_SCHEMA
from daybook.infrastructure.streaming import envelope
from daybook.infrastructure.streaming.broker import (
    DEFAULT_PARTITIONS,
    DEFAULT_TOPIC,
    TopicMismatch,
    bootstrap_servers,
    ensure_topic,
)
from daybook.infrastructure.streaming.faults import crash_point
from daybook.infrastructure.transient import is_transient
from daybook.infrastructure.urls import SERVER_LIVENESS, postgres_params, scheme

log = logging.getLogger("daybook.relay")

CURSOR_TABLE = "daybook_relay_cursors"

#: One relay per topic and event store: advisory locks are the database's, so a ledger in
#: another schema of it (its search_path) keys its relays' locks with its schema too, or
#: its relay would wait as a standby for the other ledger's. Keys in ``public`` are as they
#: always were (an older relay during a rolling upgrade takes the same lock).
_TAKE_RELAY_LOCK = (
    "SELECT pg_try_advisory_lock(hashtextextended(%s || CASE current_schema() "
    "WHEN 'public' THEN '' ELSE '@' || current_schema() END, 0))"
)

#: Seconds a relay waiting for the broker gives the event store to say where the log's head
#: is (its lag gauge); no answer within them, and the gauge waits for the next retry.
LAG_GLANCE_SECONDS = 1.0
UNKNOWN_OFFSET = -1


@dataclass(frozen=True)
class RelayCursor:
    """How far the relay got, as stored in PostgreSQL."""

    topic: str
    position: int
    partitions: int
    chain: tuple[int, ...]
    next_offsets: tuple[int, ...]
    #: How many times a broker that lost acknowledged messages made the relay start over.
    republished: int = 0

    @classmethod
    def empty(cls, topic: str, partitions: int) -> RelayCursor:
        return cls(topic, 0, partitions, (0,) * partitions, (0,) * partitions)


@dataclass(frozen=True)
class RelayConfig:
    store_url: str
    broker_url: str
    topic: str = DEFAULT_TOPIC
    partitions: int = DEFAULT_PARTITIONS
    batch_size: int = 5000
    #: Polling interval beside LISTEN/NOTIFY (a lost notification costs at most this).
    poll_interval: float = 0.5
    #: Backoff bounds (seconds) while the broker or the database is unreachable.
    backoff_min: float = 0.1
    backoff_max: float = 5.0
    #: How long the broker may take to acknowledge a batch before it counts as down.
    request_timeout: float = settings.DEFAULT_RELAY_REQUEST_TIMEOUT


@dataclass
class RelayStats:
    published: int = 0
    batches: int = 0
    republished: int = 0
    last_error: str | None = None
    state: str = "starting"
    started_at: float = field(default_factory=time.monotonic)


def lost_offsets(
    first: Mapping[int, int], next_offsets: Sequence[int]
) -> list[tuple[int, int, int]]:
    """The partitions whose first offset acknowledged now (``first``) is below the next one
    earlier acknowledgements promised (``next_offsets``; ``UNKNOWN_OFFSET``: none known): the
    broker lost messages it had acknowledged, the last one alone included (an unclean leader
    election). Each as (partition, offset expected, offset acknowledged)."""
    return [
        (p, next_offsets[p], offset)
        for p, offset in first.items()
        if next_offsets[p] != UNKNOWN_OFFSET and offset < next_offsets[p]
    ]


class BrokerLostData(Exception):
    """The broker acknowledged a message at an offset below one it acknowledged before.

    The relay then re-publishes the log with a *new* producer. The Tansu test broker, once
    restarted on memory storage, accepts a produce request for a topic it no longer knows
    from a producer whose metadata predates the restart (the batch in flight, or the next
    one), creating the topic on the fly but without registering it: the next metadata
    request for that name (any consumer's) creates it again, empty, and fetches then see a
    partition with high watermark 0 while list-offsets still counts the earlier records.
    A new producer asks for metadata first (``ensure_topic``), so the re-published log lands
    in the topic consumers read. (Probed against Tansu 0.6.0; a real Kafka has no such path,
    and a new producer costs nothing there.)
    """

    def __init__(self, message: str, restart: RelayCursor) -> None:
        super().__init__(message)
        #: Where to go on from: the start of the log (see ``Relay._publish``).
        self.restart = restart


#: How many of a partition's last offsets the topic check reads (see ``_refuse_another_store``).
_CHECK_WINDOW = 64


class TopicOfAnotherStore(Refused):
    """The topic's partitions end with messages another event store's relay published."""

    code = "topic_of_another_store"

    def __init__(self, topic: str, store: str, other: str, partition: int) -> None:
        super().__init__(
            f"topic {topic!r} holds events of another event store (store {other}, last "
            f"message of partition {partition}; this one is {store}): consumers would mix "
            "the two logs; give each event store (each database, or each schema of one holding a "
            "ledger) its own --topic"
        )
        self.topic = topic
        self.store = store
        self.other = other


class Relay:
    """Publishes the log to Kafka: ``await relay.run()`` until ``relay.stop()``."""

    def __init__(self, config: RelayConfig, log: EventLog, *, owns_log: bool = False) -> None:
        if scheme(config.store_url) != "postgresql":
            raise ValueError("the outbox relay needs a postgresql:// event store")
        self.config = config
        self.stats = RelayStats()
        self._log = log
        self._owns_log = owns_log
        self._conninfo = postgres_params(config.store_url).conninfo()
        self._bootstrap = bootstrap_servers(config.broker_url)
        self._stopping = asyncio.Event()
        self._attempt = 0
        #: Whether the relay has yet to publish to the end of the log (see ``_caught_up``).
        self._behind = True
        #: The log position the stored cursor has reached (see ``_wait_for_broker``).
        self._published_to = 0
        #: The event store's identity, named in every message (read when leading).
        self._store_id: str | None = None
        #: Whether the topic was found to hold no other store's messages (once per lead).
        self._topic_checked = False
        #: The relay as a service: the database unreachable at any point (reading the log,
        #: holding the lock, moving the cursor) restarts it after a backoff, from the stored
        #: cursor; anything else stops it as FAILED with the reason.
        self.service = SupervisedTask(
            "relay",
            self._relay,
            policy=RestartPolicy(initial=config.backoff_min, ceiling=config.backoff_max),
            on_failure=self._record_failure,
        )

    def stop(self) -> None:
        """Ask ``run`` to finish the batch in hand and return (call on the loop's thread)."""
        self._stopping.set()
        self.service.stop()

    def health(self) -> Health:
        return self.service.health()

    def close(self) -> None:
        """Release the log, if the relay was given it to own (see ``bootstrap``)."""
        if self._owns_log:
            self._log.close()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> Health:
        """Relay until stopped: standby while another relay holds the lock, back off (with
        jitter) while the database or the broker is down, resume from the stored cursor.
        Returns the final health (FAILED, with the reason, after an error no retry cures)."""
        try:
            await self.service.run()
        finally:
            self.stats.state = "stopped"
        return self.service.health()

    async def _relay(self, stopping: Stopping) -> None:
        async with self._leadership() as lock_conn:
            if lock_conn is not None:
                await self._lead(lock_conn)

    @contextlib.asynccontextmanager
    async def _leadership(self) -> AsyncIterator[psycopg.AsyncConnection[Any] | None]:
        """The lock connection once this relay holds the topic's advisory lock (None if
        stopped while waiting as a standby)."""
        conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        try:
            await conn.execute(SERVER_LIVENESS)  # it holds the topic's lock
            await _create_cursor_table(conn)
            self._store_id = await ensure_store_id(conn)
            waited = False
            while not self._stopping.is_set():
                cur = await conn.execute(_TAKE_RELAY_LOCK, (f"daybook.relay/{self.config.topic}",))
                row = await cur.fetchone()
                self.service.supervisor.recovered()  # the database answered: back to work
                if row and row[0]:
                    if waited:
                        log.info("relay: took over topic %s", self.config.topic)
                    break
                if not waited:
                    log.info("relay: standby (another relay publishes %s)", self.config.topic)
                    waited = True
                    # The topic's lag is the leader's to say: a figure of this relay's (from
                    # when it led) would stay beside it, for as long as it stands by.
                    with contextlib.suppress(KeyError):
                        metrics.RELAY_LAG_EVENTS.remove(self.config.topic)
                self.stats.state = "standby"
                await self._sleep(self.config.poll_interval)
            else:
                yield None
                return
            yield conn
        finally:
            # Closing the session releases the advisory lock.
            await conn.close()

    async def _lead(self, lock_conn: psycopg.AsyncConnection[Any]) -> None:
        cursor = await _load_cursor(lock_conn, self.config.topic, self.config.partitions)
        self._published_to = cursor.position
        self._topic_checked = False
        log.info("relay: publishing %s from log position %d", cursor.topic, cursor.position)
        channel = getattr(self._log.recorder, "channel_name", "daybook_events")
        while not self._stopping.is_set():
            try:
                producer = await self._start_producer()
            except TopicMismatch:
                if not (cursor.position or any(cursor.next_offsets) or cursor.republished):
                    # The cursor this run made, nothing published under it: kept, its count
                    # would refuse the next run, started with the topic's count as the
                    # refusal says.
                    await _forget_cursor(lock_conn, cursor.topic)
                raise
            if producer is None:
                continue
            # Listening only while publishing: a session that listens and is not read (the
            # broker down, for as long as that lasts) holds back the server's notification
            # queue, which every commit adds to; when it is full, commits fail. Listening
            # starts before the first read of the log, so nothing committed is missed.
            listen: psycopg.AsyncConnection[Any] | None = None
            broker_down = False
            try:
                listen = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                await listen.execute(SERVER_LIVENESS)
                await listen.execute(SQL("LISTEN {}").format(Identifier(channel)))
                cursor = await self._publish_until_stopped(lock_conn, listen, producer, cursor)
            except (TimeoutError, KafkaError) as error:
                if not is_transient(error):
                    raise
                # The broker is down: keep the lock (and the cursor) and wait for it.
                self._failed("broker", error)
                broker_down = True
            finally:
                if listen is not None:
                    await listen.close()
                # Within the broker's time, the producer's tasks and connections with it
                # (``stop_producer``: aiokafka's own stop, cut short, left them running).
                await stop_producer(producer, self.config.request_timeout)
            if broker_down:
                await self._wait_for_broker()  # listening no more (see above)
                # On from the cursor saved last: the one this loop holds is where the lead
                # began (``_publish_until_stopped`` returns the cursor it moved only when it
                # returns), and every batch published since would go out again.
                cursor = await _load_cursor(lock_conn, self.config.topic, self.config.partitions)

    async def _start_producer(self) -> AIOKafkaProducer | None:
        """A started producer on a topic with the right partitions, or None after a failed
        attempt (already backed off)."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            acks="all",
            linger_ms=2,
            max_batch_size=1 << 20,
            request_timeout_ms=int(self.config.request_timeout * 1000),
            retry_backoff_ms=200,
        )
        try:
            await ensure_topic(self._bootstrap, self.config.topic, self.config.partitions)
            if not self._topic_checked:
                await self._refuse_another_store()
                self._topic_checked = True
            await producer.start()
            return producer
        except Exception as error:
            await stop_producer(producer, self.config.request_timeout)
            if not is_transient(error):
                raise  # TopicMismatch (refused), an authorization: a retry cannot help
            self._failed("broker", error)
            await self._wait_for_broker()
            return None

    async def _refuse_another_store(self) -> None:
        """Raise ``TopicOfAnotherStore`` if a partition's last message names another store
        (messages of an older relay name none, and pass); ``RequestTimedOutError`` (an outage:
        the relay backs off and checks again) if a last message could not be read in time."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            # A seek below what retention has left (deleted meanwhile) reads from the start,
            # not from the end, where nothing would come.
            auto_offset_reset="earliest",
            request_timeout_ms=int(self.config.request_timeout * 1000),
        )
        try:
            await consumer.start()  # inside: a start that fails leaves a client to close
            parts = [TopicPartition(self.config.topic, p) for p in range(self.config.partitions)]
            consumer.assign(parts)
            ends = await consumer.end_offsets(parts)
            # A partition whose every message is gone (deleted by retention or by request)
            # has nothing left to tell: only partitions that hold their last one are read.
            starts = await consumer.beginning_offsets(parts)
            waiting = {tp for tp in parts if ends[tp] > starts[tp]}
            # The last offset may hold no record a consumer is given (a transaction's commit
            # marker, a record compaction removed): read the last few, keep the last one.
            for tp in waiting:
                consumer.seek(tp, max(starts[tp], ends[tp] - _CHECK_WINDOW))
            last: dict[TopicPartition, Any] = {}
            # One bound for the whole read: ``position`` waits for as long as an offset reset
            # cannot reach the broker. (A window that holds no record at all, only markers
            # or compaction holes, holds nothing a relay wrote, and passes.)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.request_timeout):
                    while waiting:
                        fetched = await consumer.getmany(*waiting, timeout_ms=200, max_records=500)
                        for tp, records in fetched.items():
                            last.update((tp, r) for r in records if r.offset < ends[tp])
                        for tp in list(waiting):
                            if await consumer.position(tp) >= ends[tp]:
                                waiting.discard(tp)
            if waiting:
                # Unchecked is not checked: publishing now could mix two stores' events.
                unread = ", ".join(str(tp.partition) for tp in sorted(waiting))
                raise RequestTimedOutError(
                    f"the last messages of partition(s) {unread} of topic"
                    f" {self.config.topic!r} could not be read within"
                    f" {self.config.request_timeout:g}s to check which event store wrote them"
                )
            for tp, record in last.items():
                try:
                    other = envelope.decode(record.value).store
                except envelope.BadEnvelope:
                    continue
                if other is not None and other != self._store_id:
                    raise TopicOfAnotherStore(
                        self.config.topic, str(self._store_id), other, tp.partition
                    )
        finally:
            await consumer.stop()

    async def _publish_until_stopped(
        self,
        lock_conn: psycopg.AsyncConnection[Any],
        listen: psycopg.AsyncConnection[Any],
        producer: AIOKafkaProducer,
        cursor: RelayCursor,
    ) -> RelayCursor:
        self.stats.state = "live"
        while not self._stopping.is_set():
            # What commits sent so far is read now, before the log (which has those
            # commits): under steady load a read seldom finds nothing, the relay seldom
            # waits, and notifications left unread hold back the server's queue.
            async for _ in listen.notifies(timeout=0):
                pass
            batch = await asyncio.to_thread(
                self._log.notifications, cursor.position, self.config.batch_size
            )
            if not batch:
                self.service.supervisor.recovered()  # the broker was reached (a producer)
                self._caught_up(cursor.position)
                await self._wait_for_events(listen)
                continue
            try:
                moved = await self._publish(producer, cursor, batch)
            except BrokerLostData as lost:
                log.warning("relay: %s; re-publishing the log from the start", lost)
                await _save_cursor(lock_conn, lost.restart)
                self._published_to = lost.restart.position
                self.stats.republished = lost.restart.republished
                # With a new producer: see ``BrokerLostData``.
                return lost.restart
            crash_point("relay.after_send")
            await _save_cursor(lock_conn, moved)
            self._published_to = moved.position
            self.service.supervisor.recovered()  # a batch published and its cursor saved
            self.stats.published += len(batch)
            self.stats.batches += 1
            self.stats.republished = moved.republished
            self._attempt = 0
            cursor = moved
            metrics.RELAY_PUBLISHED.labels(self.config.topic).inc(len(batch))
            if len(batch) >= self.config.batch_size:
                # More to come: the rest of the log, estimated by positions (gaps count).
                self._say_lag(await asyncio.to_thread(self._log.head))
                self._behind = True
            else:
                self._caught_up(cursor.position)
        return cursor

    def _caught_up(self, position: int) -> None:
        """Published to the end of the log: lag 0, said once after a start, a reconnect
        (to the database or the broker) or a backlog."""
        metrics.RELAY_LAG_EVENTS.labels(self.config.topic).set(0)
        if self._behind:
            self._behind = False
            log.info("relay: caught up: published %s to log position %d",
                     self.config.topic, position)  # fmt: skip

    async def _publish(
        self, producer: AIOKafkaProducer, cursor: RelayCursor, batch: Sequence[Notification]
    ) -> RelayCursor:
        """Send ``batch`` and wait for every acknowledgement; the cursor after it."""
        partitions = cursor.partitions
        decode: Decode = self._log.mapper.decode_versioned
        #: Per event of the batch, in order: its traceparent (only when tracing).
        traced: list[str | None] = []
        if tracing.enabled():
            decode_plain = decode

            def decode_traced(notification: Notification) -> tuple[dict[str, Any], int]:
                state, schema = decode_plain(notification)
                traced.append(tracing.traceparent_in(state))
                return state, schema

            decode = decode_traced
        planned, chain = plan_messages(batch, cursor.chain, decode, store=self._store_id)
        sent: list[tuple[int, asyncio.Future[Any]]] = []
        with tracing.continued(
            "daybook.relay.publish",
            zip(traced, (n.id for n in batch), strict=False),
            kind=SpanKind.PRODUCER,
            attributes={"daybook.topic": self.config.topic, "daybook.batch.size": len(batch)},
        ) as spans:
            # Each event's message carries its publish span's context in a header, so the
            # worker that applies it continues the trace from there.
            headers = {
                parent: [("traceparent", (tracing.traceparent_of(span) or "").encode())]
                for parent, span in spans.items()
            }
            for index, (partition, key, value) in enumerate(planned):
                parent = traced[index] if index < len(traced) else None
                future = await producer.send(
                    self.config.topic,
                    value,
                    key=key,
                    partition=partition,
                    headers=headers.get(parent) if parent is not None else None,
                )
                sent.append((partition, future))
            crash_point("relay.mid_send")
            results = await asyncio.wait_for(
                asyncio.gather(*(future for _, future in sent)), self.config.request_timeout * 2
            )
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for (partition, _), metadata in zip(sent, results, strict=True):
            first.setdefault(partition, metadata.offset)
            last[partition] = metadata.offset
        next_offsets = list(cursor.next_offsets)
        lost = lost_offsets(first, next_offsets)
        for partition, offset in last.items():
            next_offsets[partition] = offset + 1
        moved = replace(
            cursor,
            position=batch[-1].id,
            chain=chain,
            next_offsets=tuple(next_offsets),
        )
        if not lost:
            return moved
        # The offsets just acknowledged may belong to a topic the restarted broker is about to
        # replace (see ``BrokerLostData``): every next offset is unknown until the new
        # producer publishes there.
        restart = RelayCursor(
            topic=cursor.topic,
            position=0,
            partitions=partitions,
            chain=(0,) * partitions,
            next_offsets=(UNKNOWN_OFFSET,) * partitions,
            republished=cursor.republished + 1,
        )
        details = ", ".join(f"partition {p} expected offset {e} got {g}" for p, e, g in lost)
        raise BrokerLostData(f"broker lost acknowledged messages ({details})", restart)

    # -- waiting -----------------------------------------------------------------------------

    async def _wait_for_events(self, listen: psycopg.AsyncConnection[Any]) -> None:
        """Until a NOTIFY from the event store, the poll interval, or stop."""

        async def notified() -> None:
            async for _ in listen.notifies(timeout=self.config.poll_interval, stop_after=1):
                pass

        waiter = asyncio.ensure_future(notified())
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        if waiter.done() and not waiter.cancelled() and waiter.exception() is not None:
            raise waiter.exception()  # type: ignore[misc]  # re-raise the listener's error

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _backoff(self) -> None:
        """Exponential backoff with full jitter, so restarted relays do not stampede."""
        ceiling = min(self.config.backoff_max, self.config.backoff_min * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 30)
        await self._sleep(random.uniform(ceiling / 2, ceiling))

    async def _wait_for_broker(self) -> None:
        """Back off while the broker is down, first saying how many events wait unpublished:
        the events written since the cursor's position count as lag, as they pile up, and
        not the 0 of the last batch published. The head is read bounded (``glance``): when
        the event store is away too, the figure waits for the next retry."""
        glanced = await asyncio.to_thread(self._log.glance, (), LAG_GLANCE_SECONDS)
        if glanced is not None:
            self._say_lag(glanced[0])
        await self._backoff()

    def _say_lag(self, head: int) -> None:
        """The events up to ``head`` past the cursor saved last, as the relay's lag."""
        metrics.RELAY_LAG_EVENTS.labels(self.config.topic).set(max(0, head - self._published_to))

    def _record_failure(self, error: BaseException) -> None:
        self._behind = True
        self.stats.last_error = f"{type(error).__name__}: {error}"

    def _failed(self, what: str, error: BaseException) -> None:
        """An outage the relay waits out itself, holding its lock and cursor: its health
        says it retries (until a batch is published, or it finds nothing to publish)."""
        self._behind = True
        self.stats.state = f"waiting for {what}"
        self.stats.last_error = f"{type(error).__name__}: {error}"
        self.service.supervisor.move(
            ServiceState.RETRYING, f"{what} unavailable: {self.stats.last_error}"
        )
        log.warning("relay: %s unavailable (%s); retrying", what, self.stats.last_error)


#: A stored event's state and the schema version it is at (``ContractMapper.decode_versioned``).
Decode = Callable[[Notification], tuple[dict[str, Any], int]]


def plan_messages(
    batch: Sequence[Notification],
    chain: Sequence[int],
    decode: Decode,
    *,
    store: str | None = None,
) -> tuple[list[tuple[int, bytes | None, bytes]], tuple[int, ...]]:
    """The messages that publish ``batch`` after ``chain`` (the last position sent to each
    partition): ``(partition, key, value)`` in order, then a mark for every partition (see
    ``envelope.MARK``), and the chain after them. Pure: the same log and chain always give
    the same messages, which is what lets consumers tell a re-published event from a new
    one. Each envelope names the schema its payload is at, which is the stored one when
    newer code wrote the event: a worker upcasts only what is older than its code. Every
    message names ``store``, the identity of the event store the batch was read from."""
    links = list(chain)
    partitions = len(links)
    planned: list[tuple[int, bytes | None, bytes]] = []
    for notification in batch:
        key = envelope.partition_key(notification.originator_id)
        partition = envelope.partition_for(key, partitions)
        state, schema = decode(notification)
        _, value = envelope.encode(
            notification.topic, state, notification.id, links[partition], schema, store
        )
        links[partition] = notification.id
        planned.append((partition, key, value))
    if batch:
        last = batch[-1].id
        planned.extend(
            (partition, None, envelope.encode_mark(last, prev, store))
            for partition, prev in enumerate(links)
        )
    return planned, tuple(links)


# -- the cursor table -------------------------------------------------------------------------

_CREATE = SQL(
    "CREATE TABLE IF NOT EXISTS {} ("
    "topic text PRIMARY KEY, position bigint NOT NULL, partitions int NOT NULL, "
    "chain bigint[] NOT NULL, next_offsets bigint[] NOT NULL, "
    "republished int NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now())"
).format(Identifier(CURSOR_TABLE))


async def _create_cursor_table(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(psycopg.errors.UniqueViolation):
        # Two relays starting together can race on CREATE TABLE IF NOT EXISTS.
        await conn.execute(_CREATE)


async def _load_cursor(
    conn: psycopg.AsyncConnection[Any], topic: str, partitions: int
) -> RelayCursor:
    empty = RelayCursor.empty(topic, partitions)
    await conn.execute(
        SQL(
            "INSERT INTO {} (topic, position, partitions, chain, next_offsets) "
            "VALUES (%s, 0, %s, %s, %s) ON CONFLICT (topic) DO NOTHING"
        ).format(Identifier(CURSOR_TABLE)),
        (topic, partitions, list(empty.chain), list(empty.next_offsets)),
    )
    cur = await conn.execute(
        SQL(
            "SELECT position, partitions, chain, next_offsets, republished FROM {} WHERE topic = %s"
        ).format(Identifier(CURSOR_TABLE)),
        (topic,),
    )
    row = await cur.fetchone()
    assert row is not None
    position, stored_partitions, chain, next_offsets, republished = row
    if stored_partitions != partitions:
        raise TopicMismatch(
            f"the relay's cursor for topic {topic!r} was made for {stored_partitions} "
            f"partitions, and the relay runs with {partitions}: start it with --partitions "
            f"{stored_partitions}, or publish to a new --topic to change the partition count"
        )
    return RelayCursor(topic, position, partitions, tuple(chain), tuple(next_offsets), republished)


async def _forget_cursor(conn: psycopg.AsyncConnection[Any], topic: str) -> None:
    await conn.execute(
        SQL("DELETE FROM {} WHERE topic = %s").format(Identifier(CURSOR_TABLE)), (topic,)
    )


async def _save_cursor(conn: psycopg.AsyncConnection[Any], cursor: RelayCursor) -> None:
    await conn.execute(
        SQL(
            "UPDATE {} SET position = %s, chain = %s, next_offsets = %s, republished = %s, "
            "updated_at = now() WHERE topic = %s"
        ).format(Identifier(CURSOR_TABLE)),
        (
            cursor.position,
            list(cursor.chain),
            list(cursor.next_offsets),
            cursor.republished,
            cursor.topic,
        ),
    )


def read_cursor(store_url: str, topic: str = DEFAULT_TOPIC) -> RelayCursor | None:
    """The stored cursor of the relay for ``topic`` (None before the first run)."""
    with psycopg.connect(postgres_params(store_url).conninfo(), autocommit=True) as conn:
        exists = conn.execute(f"SELECT {IN_OWN_SCHEMA}", (CURSOR_TABLE,)).fetchone()
        if not exists or exists[0] is None:
            return None
        row = conn.execute(
            SQL(
                "SELECT position, partitions, chain, next_offsets, republished FROM {} "
                "WHERE topic = %s"
            ).format(Identifier(CURSOR_TABLE)),
            (topic,),
        ).fetchone()
    if row is None:
        return None
    position, partitions, chain, next_offsets, republished = row
    return RelayCursor(topic, position, partitions, tuple(chain), tuple(next_offsets), republished)


class RewindRefused(RuntimeError):
    """A rewind that cannot make the relay re-publish the log; nothing was changed."""

    code = "rewind_refused"


def rewind(store_url: str, topic: str = DEFAULT_TOPIC) -> None:
    """Make the relay re-publish the whole log (consumers skip what they already have).

    Used to rebuild through the stream when the topic no longer holds the whole log.
    The expected offsets are kept: nothing was lost, so a lower one is still a loss.
    Raises ``RewindRefused`` while a relay publishes ``topic``, and when no relay has
    published it (a mistyped topic would otherwise rewind nothing and report success).
    """
    with psycopg.connect(postgres_params(store_url).conninfo(), autocommit=True) as conn:
        # A running relay keeps its cursor in memory and would write it back: refuse.
        lock = conn.execute(_TAKE_RELAY_LOCK, (f"daybook.relay/{topic}",)).fetchone()
        if not lock or not lock[0]:
            raise RewindRefused(f"a relay is publishing {topic!r}: stop it before rewinding")
        exists = conn.execute(f"SELECT {IN_OWN_SCHEMA}", (CURSOR_TABLE,)).fetchone()
        if not exists or exists[0] is None:
            raise RewindRefused(
                "no relay has published from this database yet: its first run publishes the "
                "whole log, nothing to rewind"
            )
        rewound = conn.execute(
            SQL(
                "UPDATE {} SET position = 0, chain = array_fill(0::bigint, ARRAY[partitions]), "
                "updated_at = now() WHERE topic = %s"
            ).format(Identifier(CURSOR_TABLE)),
            (topic,),
        )
        if rewound.rowcount == 0:
            rows = conn.execute(
                SQL("SELECT topic FROM {} ORDER BY topic").format(Identifier(CURSOR_TABLE))
            ).fetchall()
            known = ", ".join(str(row[0]) for row in rows) or "none"
            raise RewindRefused(
                f"no relay has published topic {topic!r}; the topics relays published: {known}"
            )
